# Written by `bentoctl generate` (operator clip-sagemaker, this repository's
# bentoctl/sagemaker-operator). The same resources scripts/deploy_sagemaker.py creates: model,
# endpoint configuration, endpoint (blue/green updates) and target-tracking autoscaling.
# Values come from bentoctl.tfvars: terraform init && terraform apply -var-file=bentoctl.tfvars

terraform {
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "deployment_name" {
  type        = string
  description = "the endpoint's name; models and configs get it plus a content hash"
}

variable "region" {
  type = string
}

variable "image_tag" {
  type        = string
  description = "the image in ECR (bentoctl build writes it after the push)"
}

variable "execution_role_arn" {
  type        = string
  description = "the role SageMaker assumes: pull the image, write logs (README, IAM)"
}

variable "instance_type" {
  type = string
}

variable "initial_instance_count" {
  type = number
}

variable "inference_ami_version" {
  type        = string
  default     = null
  description = "the hosts' AMI, which sets their NVIDIA driver; null: SageMaker's default"
}

variable "startup_timeout" {
  type        = number
  description = "ContainerStartupHealthCheckTimeoutInSeconds: pull + model load + warm-up"
}

variable "network_isolation" {
  type = bool
}

variable "model_data_url" {
  type        = string
  default     = null
  description = "s3://.../model.tar.gz: a CLIP checkpoint served instead of the image's"
}

variable "env" {
  type    = map(string)
  default = {}
}

variable "bake_seconds" {
  type        = number
  description = "blue/green: how long the old fleet stays after the switch"
}

variable "autoscaling_min_instances" {
  type        = number
  description = "0: no autoscaling"
}

variable "autoscaling_max_instances" {
  type = number
}

variable "autoscaling_target" {
  type        = number
  description = "invocations per instance per minute to hold"
}

variable "autoscaling_scale_in_cooldown" {
  type = number
}

variable "autoscaling_scale_out_cooldown" {
  type = number
}

locals {
  variant = "AllTraffic"
  # Endpoint configs are immutable: a new one (and model) per change, named by its content.
  revision = substr(sha1(jsonencode([
    var.image_tag, var.execution_role_arn, var.network_isolation, var.model_data_url, var.env,
    var.instance_type, var.initial_instance_count, var.startup_timeout, var.inference_ami_version,
  ])), 0, 12)
  autoscaling = var.autoscaling_min_instances > 0 ? 1 : 0
}

resource "aws_sagemaker_model" "clip" {
  name                     = "${var.deployment_name}-${local.revision}"
  execution_role_arn       = var.execution_role_arn
  enable_network_isolation = var.network_isolation

  primary_container {
    image          = var.image_tag
    mode           = "SingleModel"
    environment    = var.env
    model_data_url = var.model_data_url
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_sagemaker_endpoint_configuration" "clip" {
  name = "${var.deployment_name}-${local.revision}"

  production_variants {
    variant_name                                      = local.variant
    model_name                                        = aws_sagemaker_model.clip.name
    instance_type                                     = var.instance_type
    initial_instance_count                            = var.initial_instance_count
    initial_variant_weight                            = 1
    container_startup_health_check_timeout_in_seconds = var.startup_timeout
    inference_ami_version                             = var.inference_ami_version
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_sagemaker_endpoint" "clip" {
  name                 = var.deployment_name
  endpoint_config_name = aws_sagemaker_endpoint_configuration.clip.name

  deployment_config {
    blue_green_update_policy {
      traffic_routing_configuration {
        type                     = "ALL_AT_ONCE"
        wait_interval_in_seconds = 0
      }
      termination_wait_in_seconds          = var.bake_seconds
      maximum_execution_timeout_in_seconds = min(28800, max(1800, var.startup_timeout + 2 * var.bake_seconds + 600))
    }
  }
}

resource "aws_appautoscaling_target" "clip" {
  count              = local.autoscaling
  service_namespace  = "sagemaker"
  resource_id        = "endpoint/${aws_sagemaker_endpoint.clip.name}/variant/${local.variant}"
  scalable_dimension = "sagemaker:variant:DesiredInstanceCount"
  min_capacity       = var.autoscaling_min_instances
  max_capacity       = var.autoscaling_max_instances
}

resource "aws_appautoscaling_policy" "clip" {
  count              = local.autoscaling
  name               = "${var.deployment_name}-invocations-per-instance"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.clip[0].service_namespace
  resource_id        = aws_appautoscaling_target.clip[0].resource_id
  scalable_dimension = aws_appautoscaling_target.clip[0].scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.autoscaling_target
    scale_in_cooldown  = var.autoscaling_scale_in_cooldown
    scale_out_cooldown = var.autoscaling_scale_out_cooldown

    predefined_metric_specification {
      predefined_metric_type = "SageMakerVariantInvocationsPerInstance"
    }
  }
}

output "endpoint_name" {
  value = aws_sagemaker_endpoint.clip.name
}
