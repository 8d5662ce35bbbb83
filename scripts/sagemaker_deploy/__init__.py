"""scripts/deploy_sagemaker.py's code, one job a module (the script is the command line).

- errors: the three ways a run fails, each with its exit status;
- builders: the pure request builders and checks (no AWS);
- aws: boto3 at the edge: the `Aws` wrapper and the lookups and waits the subcommands share;
- settings: what an endpoint runs and what an update keeps, and the checks before an update;
- async_inference: asynchronous endpoints' config and their scale-to-zero autoscaling;
- commands: the push, deploy, autoscale, delete and invoke subcommands;
- batch: the batch-transform subcommand.

Imported as `sagemaker_deploy`, with scripts/ on sys.path (where Python puts it when it runs the
script).
"""
