"""What every process shares, whatever it runs: who am I (Dist), seeds, threads and dtypes,
the metrics sink and progress. The only place that reads RANK / WORLD_SIZE / LOCAL_RANK."""
