"""Environment adapters: each turns a world into text trajectories (see ``envs.base.TextWorld``)."""
