# The local baseline: always-on OpenStack GPU servers, a group per point of presence, that join
# the Kubernetes cluster at boot (modules/gpu-baseline). runpod-autoscaler counts their GPUs
# before any RunPod pod: point `[baseline] terraform_output` at `terraform output -json`.

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

module "pop" {
  source   = "./modules/gpu-baseline"
  for_each = var.pops

  pop                  = each.key
  name_prefix          = var.name_prefix
  node_count           = each.value.node_count
  gpus_per_node        = coalesce(each.value.gpus_per_node, var.gpus_per_node)
  flavor_name          = coalesce(each.value.flavor_name, var.flavor_name)
  image_name           = var.image_name
  availability_zone    = each.value.availability_zone
  network_name         = var.network_name
  key_pair             = var.key_pair
  security_group_names = [openstack_networking_secgroup_v2.gpu.name]
  api_server_endpoint  = var.api_server_endpoint
  join_token           = var.join_token
  ca_cert_hash         = var.ca_cert_hash
}
