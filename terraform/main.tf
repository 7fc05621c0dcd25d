# The local baseline: always-on OpenStack GPU servers that join the Kubernetes cluster at boot
# and are labelled so the GPU workers schedule on them before any RunPod pod.

resource "openstack_networking_secgroup_v2" "gpu" {
  name        = "${var.name_prefix}-nodes"
  description = "GPU baseline nodes: SSH from operators, kubelet and overlay from the cluster"
}

resource "openstack_networking_secgroup_rule_v2" "ssh" {
  security_group_id = openstack_networking_secgroup_v2.gpu.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 22
  port_range_max    = 22
  remote_ip_prefix  = var.admin_cidr
}

resource "openstack_networking_secgroup_rule_v2" "kubelet" {
  security_group_id = openstack_networking_secgroup_v2.gpu.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 10250
  port_range_max    = 10250
  remote_ip_prefix  = var.cluster_cidr
}

resource "openstack_networking_secgroup_rule_v2" "overlay" {
  security_group_id = openstack_networking_secgroup_v2.gpu.id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "udp"
  port_range_min    = 8472
  port_range_max    = 8472
  remote_ip_prefix  = var.cluster_cidr
}

resource "openstack_compute_instance_v2" "gpu" {
  count           = var.node_count
  name            = format("%s-%02d", var.name_prefix, count.index)
  flavor_name     = var.flavor_name
  image_name      = var.image_name
  key_pair        = var.key_pair
  security_groups = [openstack_networking_secgroup_v2.gpu.name]

  network {
    name = var.network_name
  }

  metadata = {
    role          = "gpu-baseline"
    gpus_per_node = tostring(var.gpus_per_node)
  }

  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    join_command = var.join_command
    node_labels  = "gpu.platform/pool=baseline"
  })

  lifecycle {
    ignore_changes = [user_data]
  }
}
