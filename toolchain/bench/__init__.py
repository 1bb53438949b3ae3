"""The bench's libraries: learning-rate selection, convergence, the jobs it runs, its report."""
