"""The pure core: plain values in, plain values out (no Airflow, no clients of their own, no processes)."""
