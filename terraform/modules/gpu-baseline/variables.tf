variable "pop" {
  description = "Point of presence this group of servers belongs to (a label and a name part)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$", var.pop))
    error_message = "pop must be 1-32 lowercase letters, digits or '-', not starting or ending with '-'."
  }
}

variable "name_prefix" {
  description = "Prefix of every server name: <prefix>-<pop>-<NN>."
  type        = string
}

variable "node_count" {
  description = "Always-on GPU servers at this PoP."
  type        = number
  validation {
    condition     = var.node_count >= 0 && var.node_count <= 64 && floor(var.node_count) == var.node_count
    error_message = "node_count must be a whole number between 0 and 64."
  }
}

variable "gpus_per_node" {
  description = "GPUs the flavor passes through to each server."
  type        = number
  validation {
    condition     = var.gpus_per_node >= 1 && var.gpus_per_node <= 16 && floor(var.gpus_per_node) == var.gpus_per_node
    error_message = "gpus_per_node must be a whole number between 1 and 16."
  }
}

variable "flavor_name" {
  description = "OpenStack flavor with GPU passthrough (a vGPU or PCI-alias flavor)."
  type        = string
}

variable "image_name" {
  description = "Image with the NVIDIA driver, a container runtime and kubeadm installed."
  type        = string
}

variable "availability_zone" {
  description = "Availability zone of this PoP (null: the cloud's default)."
  type        = string
  default     = null
}

variable "network_name" {
  description = "Tenant network the Kubernetes nodes share."
  type        = string
}

variable "key_pair" {
  description = "Existing OpenStack key pair for operator SSH access."
  type        = string
}

variable "security_group_names" {
  description = "Security groups attached to every server."
  type        = list(string)
}

variable "api_server_endpoint" {
  description = "Kubernetes API endpoint the nodes join, host:port."
  type        = string
}

variable "join_token" {
  description = "kubeadm bootstrap token (abcdef.0123456789abcdef)."
  type        = string
  sensitive   = true
}

variable "ca_cert_hash" {
  description = "sha256:<hex> of the cluster CA's public key (kubeadm --discovery-token-ca-cert-hash)."
  type        = string
}
