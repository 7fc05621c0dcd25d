# runpod-autoscaler reads these from `terraform output -json` ([baseline] terraform_output).

output "baseline_nodes" {
  description = "Every baseline GPU server: name, PoP, GPUs and private address."
  value       = flatten([for k in sort(keys(module.pop)) : module.pop[k].nodes])
}

output "baseline_gpus" {
  description = "GPUs of the whole baseline: the sum of baseline_nodes[*].gpus."
  value       = sum(concat([0], flatten([for k in keys(module.pop) : module.pop[k].nodes[*].gpus])))
}
