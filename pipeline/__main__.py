"""``python -m pipeline``: see ``pipeline.cli``."""

from pipeline.startup import pause_gc

pause_gc()  # start-up only: pipeline.run_file turns the collector back on once the model is loaded

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
