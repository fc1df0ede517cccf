"""The local lab (local), its replicas (replica), real Airflow components (airflow_stack), the demo and the
EBS simulator: for `make demo`, `pgops lab` and the tests."""
