"""Pure evaluation components (no Ray): the action scorer (the policy), lockstep episodes in a live world,
held-out NLL, and interval statistics. The same code serves eval actors, training-time checks and tests."""
