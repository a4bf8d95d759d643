"""Memory planning: predict a run's memory per device from its config, and fit it to a device."""
