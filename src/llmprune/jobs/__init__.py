"""Job kinds as data (:mod:`~llmprune.jobs.registry`), the context their stages share
(:mod:`~llmprune.jobs.context`) and the report header every kind writes (:mod:`~llmprune.jobs.header`)."""
