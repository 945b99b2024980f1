"""Standard benchmarks for masked diffusion models through EleutherAI's lm-evaluation-harness.

`elbo.py` is the Monte Carlo ELBO that stands in for an autoregressive log-likelihood,
`adapter.py` the harness model (`lm_eval --model ldm`), `suites.py` the offline task suites built
from prepared held-out data. Importing this package imports neither torch nor lm_eval.
"""
