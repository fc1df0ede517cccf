"""EBS snapshot chains: the convergence planner, the migration spec, rounds, KMS key access, the backup
label."""
