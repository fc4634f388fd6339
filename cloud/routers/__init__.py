"""One router per resource: uploads, jobs, models, events, health."""
