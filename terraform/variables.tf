variable "name_prefix" {
  description = "Prefix of every resource name."
  type        = string
  default     = "gpu-baseline"
}

variable "pops" {
  description = "Points of presence: servers per PoP, and optionally its availability zone, flavor and GPUs per server."
  type = map(object({
    node_count        = number
    availability_zone = optional(string)
    flavor_name       = optional(string)
    gpus_per_node     = optional(number)
  }))
  validation {
    condition     = alltrue([for p in values(var.pops) : p.node_count >= 0 && p.node_count <= 64])
    error_message = "Each PoP's node_count must be between 0 and 64."
  }
}

variable "gpus_per_node" {
  description = "GPUs the default flavor passes through to each server."
  type        = number
  default     = 1
}

variable "flavor_name" {
  description = "Default OpenStack flavor with GPU passthrough (a vGPU or PCI-alias flavor)."
  type        = string
}

variable "image_name" {
  description = "Image with the NVIDIA driver, a container runtime and kubeadm installed."
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
  validation {
    condition     = can(cidrhost(var.admin_cidr, 0)) && var.admin_cidr != "0.0.0.0/0"
    error_message = "admin_cidr must be a CIDR narrower than 0.0.0.0/0 (SSH is not open to the world)."
  }
}

variable "cluster_cidr" {
  description = "CIDR of the Kubernetes nodes (kubelet and overlay traffic)."
  type        = string
  default     = "10.0.0.0/8"
}

variable "api_server_endpoint" {
  description = "Kubernetes API endpoint the nodes join, host:port."
  type        = string
}

variable "join_token" {
  description = "kubeadm bootstrap token; pass it as TF_VAR_join_token, never in a file."
  type        = string
  sensitive   = true
  validation {
    condition     = can(regex("^[a-z0-9]{6}\\.[a-z0-9]{16}$", var.join_token))
    error_message = "join_token must look like abcdef.0123456789abcdef (kubeadm token create)."
  }
}

variable "ca_cert_hash" {
  description = "sha256:<hex> of the cluster CA's public key (kubeadm token create --print-join-command shows it)."
  type        = string
  validation {
    condition     = can(regex("^sha256:[0-9a-f]{64}$", var.ca_cert_hash))
    error_message = "ca_cert_hash must be sha256: followed by 64 hex digits."
  }
}
