# One PoP's always-on GPU servers. Each joins the cluster at boot with kubeadm, labelled and
# tainted so that only GPU workers that tolerate the baseline land on it.

locals {
  node_labels = {
    "workload-type"    = "gpu"
    "gpu-type"         = "local-baseline"
    "preemptible"      = "false"
    "gpu.platform/pop" = var.pop
  }
}

resource "openstack_compute_instance_v2" "gpu" {
  count             = var.node_count
  name              = format("%s-%s-%02d", var.name_prefix, var.pop, count.index)
  flavor_name       = var.flavor_name
  image_name        = var.image_name
  availability_zone = var.availability_zone
  key_pair          = var.key_pair
  security_groups   = var.security_group_names

  network {
    name = var.network_name
  }

  metadata = {
    role          = "gpu-baseline"
    pop           = var.pop
    gpus_per_node = tostring(var.gpus_per_node)
  }

  # The join token is in the user data: readable from the instance's metadata service by
  # processes on the node itself (which is joining with it), not by other tenants.
  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    node_name           = format("%s-%s-%02d", var.name_prefix, var.pop, count.index)
    api_server_endpoint = var.api_server_endpoint
    join_token          = var.join_token
    ca_cert_hash        = var.ca_cert_hash
    node_labels         = join(",", [for k, v in local.node_labels : "${k}=${v}"])
  })

  lifecycle {
    # A new token must not rebuild running nodes; it only matters at first boot.
    ignore_changes = [user_data]
  }
}
