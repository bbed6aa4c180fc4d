"""Flow matching: shift schedules, training targets, samplers."""
