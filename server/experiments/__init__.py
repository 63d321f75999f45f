"""A/B experiments over interventions: definitions, assignment, durable records, reports."""
