variable "name_prefix" {
  description = "Prefix of every resource name."
  type        = string
  default     = "gpu-baseline"
}

variable "node_count" {
  description = "Always-on GPU servers in the local baseline."
  type        = number
  default     = 2
  validation {
    condition     = var.node_count >= 0 && var.node_count <= 64
    error_message = "node_count must be between 0 and 64."
  }
}

variable "gpus_per_node" {
  description = "GPUs the flavor provides; node_count * gpus_per_node is runpod-autoscaler's baseline.gpus."
  type        = number
  default     = 1
}

variable "flavor_name" {
  description = "OpenStack flavor with GPU passthrough (e.g. a vGPU or PCI alias flavor)."
  type        = string
}

variable "image_name" {
  description = "Image with the NVIDIA driver and container runtime installed."
  type        = string
}

variable "network_name" {
  description = "Tenant network the Kubernetes nodes share."
  type        = string
}

variable "key_pair" {
  description = "Existing OpenStack key pair for operator SSH access."
  type        = string
}

variable "admin_cidr" {
  description = "CIDR allowed to SSH into the nodes."
  type        = string
  default     = "10.0.0.0/8"
}

variable "cluster_cidr" {
  description = "CIDR of the Kubernetes nodes (kubelet and overlay traffic)."
  type        = string
  default     = "10.0.0.0/8"
}

variable "join_command" {
  description = "Command that joins a node to the cluster (e.g. a kubeadm or k3s agent join)."
  type        = string
  sensitive   = true
}
