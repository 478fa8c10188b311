"""Control: estimators of the link and the battery, policies that choose a plan, and the
controller that applies them (embedded in the device runner by default)."""
