"""The paper's five runs: presets (:mod:`.presets`, from ``paper/params.yaml``), Tables 1-4 and figures
(:mod:`.tables`), and the command line ``python -m experiments.paper`` that ``paper/dvc.yaml`` calls."""
