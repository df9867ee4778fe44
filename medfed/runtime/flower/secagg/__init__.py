"""Secure aggregation on Flower: FedAvg and FedProx with SecAgg+, so the server sees only the sum.

Flower offers SecAgg+ (Bell et al. 2020) through its legacy workflow: a ``LegacyContext`` and a
``DefaultWorkflow`` whose fit step is a ``SecAggPlusWorkflow``, and a ``ClientApp`` built from a
``client_fn`` with the ``secaggplus_mod``. Each site uploads ``[w, w * params]`` (``w`` =
num_examples / max_weight), quantised to integers and masked with pairwise and private masks; the
masks cancel only in the sum, so the server learns the example-weighted mean of the round's
weights and nothing about any single site's weights. medfed keeps the rest: the initial model,
the same local training (``local_round``: FedProx's proximal term works), the same participant
sampling, federated evaluation, ``history.jsonl``, checkpoints, ``final.safetensors`` and
``summary.json``.

Use::

    # simulation / tests: build the apps in Python
    from medfed.runtime.flower.secagg import SecAggOptions, secagg_client_app, secagg_server_app
    server = secagg_server_app(config, out_dir="runs/x", num_sites=3, options=SecAggOptions())
    run_simulation(server_app=server, client_app=secagg_client_app, num_supernodes=3, ...)

    # deployment: `medfed flower run CONFIG --sites N --secagg` (the SuperNodes are unchanged:
    # the Flower App names this module's ``app`` and ``secagg_client_app`` as its components)

Limits (read before relying on it):

* **At least 3 sites, at least 3 per round.** With two, each site could subtract its own update
  from the mean and read the other's. ``num_shares`` (the size of each site's neighbourhood,
  itself included) must be > 2, odd unless it equals the sites sampled per round, and no larger
  than that number.
* **Dropouts.** A site that drops out after uploading its keys is recovered from the shares its
  neighbours hold; a neighbourhood tolerates ``num_shares - reconstruction_threshold`` dropouts.
  More, and the round cannot be unmasked: the run stops with a ``FederationError``. A dropped
  site's update is left out of the mean (as the in-process runtime leaves out a failed site).
* **FedAvg family only.** The server half must be the plain example-weighted mean of full
  weights: ``fedavg`` and ``fedprox`` (whose client halves differ). Robust rules (median,
  trimmed mean, Krum) need every update on its own, which is what SecAgg+ hides; FedOpt
  (fedadam/fedyogi/fedadagrad), FedBN and SCAFFOLD need server state, partial uploads or
  control variates this path does not carry. They are refused before anything starts.
* **No update validation, no robust aggregation.** medfed's per-update checks (non-finite values,
  wrong shapes, norm limits) cannot run on updates the server never sees. An honest site refuses
  to upload non-finite weights (it drops out of the round instead), but a malicious or broken
  site can poison the mean undetectably; configured ``nan``/``wrong_shape``/``scale`` faults are
  therefore refused, ``raise``/``drop`` (dropouts) are allowed.
* **Quantisation and clipping.** Each site clips ``w * params`` to ``±clipping_range`` and
  rounds it stochastically to ``quantization_range`` levels over ``[-C, C]``. Per coordinate and
  round the mean is off by at most ``3 * k * C / (Q * sum_i w_i)`` (k contributing sites; ``k``
  quanta of stochastic rounding plus the quantised weights, divided by the total weight;
  see :func:`error_bound`): ``3C/Q`` = 5.7e-6 at the defaults when the sites are of equal
  size (``sum_i w_i = k``), up to ``3kC/Q`` when one site holds nearly all examples; plus
  float32 rounding. A round's error also moves the next round's starting point.
  The rounding is random (unseeded, inside Flower), so runs are not bit-reproducible.
  A clipped value cannot be recognised in the aggregate; instead every site checks its own
  upload and adds a clipping flag *inside* the masked vector, so the server learns only the
  example-weighted share of sites that clipped (in a small federation with known example
  counts, that share may still point at the site). By default the run stops when it is non-zero
  (``allow_clipping=True`` to go on). Parameters must lie within ``±clipping_range``.
* **max_weight** must be at least the largest ``num_examples`` a site reports in a round, or
  that site's weight overflows. By default it is derived from the sites' training-set sizes
  (asked at start) and ``train.epochs`` / ``train.max_steps``; a smaller explicit value is an
  error. Each site's ``num_examples`` (and so its training-set size) is visible to the server,
  as in Flower's SecAgg+; no other per-site training number is (``history.jsonl`` has the
  sites' example counts, NaN train losses, and the pooled train loss under ``extra``).
  Federated evaluation still reports each site's scores of the *global* model, as the plain
  Flower runtime does.
* **Differential privacy: ``local`` and ``dpsgd``, not ``central``.** The privacy step runs at
  the site before the masking (clip -> noise -> mask; DP-SGD's noise is inside local training),
  so the secure sum is a sum of updates that are already private, and the site noise is seeded
  exactly as in process (``secure_rng`` off): the result is the in-process DP run's up to the
  quantisation error. ``central`` is refused: its noise is added by an aggregator that sees the
  mean, and under SecAgg+ nobody does; it would need distributed noise shared out among the
  sites (not implemented). The server keeps ``train_loop``'s accounting
  (:class:`~medfed.privacy.run.RoundPrivacy`): it leaves out sampled sites whose next round would
  pass ``max_epsilon`` and ends the run (``summary.json`` ``stopped``) when fewer than
  ``min_clients`` -- or fewer than a secure round needs -- remain, and books ε per site per
  round in ``history.jsonl``, ``summary.json`` and the checkpoint meta. It cannot read a
  site's reported mechanism (the update's metrics are not uploaded), so it derives each
  contributing site's event from the config and the training-set size the site reported at
  start (DP-SGD: σ, sample rate and steps of that size); each site also keeps its own accountant
  in its node state and refuses a round past its budget. Local-DP noise (std σC per coordinate)
  must fit in ``±clipping_range`` next to the weights: a range that honest noise would overflow
  in more than 1e-6 of rounds is refused at start, naming the range to use
  (:func:`~medfed.runtime.flower.secagg.plan.dp_clipping_range`). DP-SGD's Poisson batches
  make the example count random: ``max_weight`` is derived from its 1 - 1e-9 quantile. The
  pooled train loss averaged inside the secure sum is not noised (the in-process runtime reports
  each site's). Relative-norm update screens do not run here (nor are they needed for
  local-DP noise, which the in-process runtime exempts from them too).
* **Integer buffers** (BatchNorm's ``num_batches_tracked``) travel through the masked vector as
  ``(value - global) / step_scale`` (``step_scale`` = the most local steps any site can take in a
  round), and the server adds back the rounded mean: the same count as medfed's FedAvg unless the
  mean lands within the quantisation error of a half.
* Federated evaluation uses medfed's own exchange (each site scores the new global model on its
  validation split; pooled AUC / Dice as in the plain Flower runtime). Checkpoints are written
  per round, but a SecAgg+ run cannot be resumed (as any Flower deployment run); with DP the
  checkpoint meta carries :class:`~medfed.privacy.run.RoundPrivacy`'s ledger in
  ``train_loop``'s form, ready for a resume to keep counting.
"""

from medfed.runtime.flower.secagg.client import (
    SecAggSiteClient,
    clipping_scale,
    medfed_messages_mod,
    secagg_client_app,
    upload_vector,
)
from medfed.runtime.flower.secagg.deploy import (
    COMPONENTS,
    app,
    options_from_run_config,
    options_to_run_config,
    run_deployment,
    write_secagg_app_dir,
)
from medfed.runtime.flower.secagg.plan import (
    MODULUS_RANGE,
    REFUSED_STRATEGIES,
    SECURE_AGGREGATION,
    SECURE_STRATEGIES,
    UNDETECTABLE_FAULTS,
    SecAggError,
    SecAggOptions,
    SecAggPlan,
    check_dp_clipping,
    check_secagg,
    dp_clipping_range,
    error_bound,
    max_examples,
    max_steps,
    round_shares_problem,
    sampled_per_round,
)
from medfed.runtime.flower.secagg.server import SecAggFedAvg, secagg_server_app, serve_secagg

__all__ = [
    "COMPONENTS",
    "MODULUS_RANGE",
    "REFUSED_STRATEGIES",
    "SECURE_AGGREGATION",
    "SECURE_STRATEGIES",
    "UNDETECTABLE_FAULTS",
    "SecAggError",
    "SecAggFedAvg",
    "SecAggOptions",
    "SecAggPlan",
    "SecAggSiteClient",
    "app",
    "check_dp_clipping",
    "check_secagg",
    "clipping_scale",
    "dp_clipping_range",
    "error_bound",
    "max_examples",
    "max_steps",
    "medfed_messages_mod",
    "options_from_run_config",
    "options_to_run_config",
    "round_shares_problem",
    "run_deployment",
    "sampled_per_round",
    "secagg_client_app",
    "secagg_server_app",
    "serve_secagg",
    "upload_vector",
    "write_secagg_app_dir",
]
