"""EBS snapshot chains: the convergence planner and a simulator to test it against."""
