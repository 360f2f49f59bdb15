"""Robustness of encoder caching under stress: does FCR's quality gain survive unusual inputs?

Per model x sampling configuration (stride 1 = plain sampling, stride s > 1 = Faster-Diffusion
uniform key steps) x stress x seed, images are generated and scored as in the stride sweep
(:mod:`fcr.experiments.sweep`); each result is a JSON file written when it is finished
(:func:`fcr.eval.results.run_or_load`). Stresses (:data:`STRESSES`):

- ``none``: the unstressed reference (training prompt templates, training resolution, the
  nominal schedule, Gaussian z_T);
- ``heldout_prompts``: prompt templates never seen in training;
- ``ood_prompts``: out-of-distribution prompts with a known class (paraphrases and compositions,
  ``fcr/prompt_lists/fashion_*.tsv``); for SD: abstract and medical prompts (no labels);
- ``high_resolution``: sampling at ``stress_resolution`` (the embedded classifier works at 32x32,
  so such images are average-pooled to 32x32 before scoring);
- ``perturbed_schedule``: the solver's noise levels are perturbed, sigma_t -> sigma_t (1 + eps_t)
  (:func:`perturbed_scheduler`); the UNet still gets the nominal timesteps;
- ``adversarial_noise``: z_T is perturbed by projected signed-gradient ascent on the cache error
  (:func:`adversarial_noise`).

For a given seed every stress uses the same class sequence (labels cycle 0..9) and, except for the
high-resolution and adversarial stresses, the same per-image initial noise, so stressed and
unstressed results are paired by seed. Drops (stressed vs unstressed) and the FCR criterion are
built from the result table by :func:`per_seed_drops`, :func:`drop_table` and
:func:`criterion_table`.
"""
