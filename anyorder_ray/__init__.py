"""anyorder-ray: Ray-distributed any-order masked training of LLM agents (LLaDA 2.0 on text worlds).

Layout: ``data/``, ``training/``, ``evaluation/`` and ``models/`` are pure components (no Ray); ``roles/`` holds the
Ray processes (buffer, rollout, train loop, eval actor, trial); ``results/`` turns runs into tables and plots;
``config.py`` is the typed configuration and ``sweep.py`` the entry point (``python -m anyorder_ray.sweep``).
Worlds are reached through ``envs`` (its registry and protocol).
"""

__version__ = "0.1.0"
