"""Step-time table and JSON: `python bench/step_time.py --help` (the engine is adaptive_lr.benchmark,
so `adaptive-lr bench` runs the same code from an installed package)."""

from adaptive_lr.benchmark import main

if __name__ == "__main__":
    main()
