"""What every benchmark stage shares: the params loader, the run grid, the benchmark interface, reports, figures,
parallel workers and teacher training."""
