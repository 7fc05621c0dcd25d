output "node_names" {
  description = "Names of the baseline GPU servers."
  value       = openstack_compute_instance_v2.gpu[*].name
}

output "node_addresses" {
  description = "Private IPv4 addresses of the baseline GPU servers."
  value       = openstack_compute_instance_v2.gpu[*].access_ip_v4
}

output "baseline_gpus" {
  description = "Set runpod-autoscaler's baseline.gpus to this."
  value       = var.node_count * var.gpus_per_node
}
