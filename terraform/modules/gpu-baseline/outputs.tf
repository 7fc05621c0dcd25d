output "nodes" {
  description = "This PoP's servers: name, PoP, GPUs and private address."
  value = [
    for s in openstack_compute_instance_v2.gpu : {
      name    = s.name
      pop     = var.pop
      gpus    = var.gpus_per_node
      address = s.access_ip_v4
    }
  ]
}
