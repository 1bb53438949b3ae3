"""Pipeline stages: orchestration only. Each reads the artifacts of the stage before it (recipe ->
run dir -> engine dir -> report) through the artifact modules, and no stage imports another."""
