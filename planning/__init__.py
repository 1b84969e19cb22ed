"""Offline tools that plan from observed traffic: bucket lists (:mod:`planning.buckets`),
Neuron plans (:mod:`planning.neuron`), Prometheus reads (:mod:`planning.prometheus`) and the
length histograms the server exports for them (:mod:`planning.length_histograms`).

They import bucketing, prometheus_client and the standard library, and ``planning.neuron`` the
torch-free :mod:`runtime.neuron_plan`; never server/ or engine/ (they talk to a server over
HTTP), and never torch."""
