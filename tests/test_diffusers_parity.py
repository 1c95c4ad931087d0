"""The test kit writes real formats: its single file loads in plain diffusers and gives sdcore's image."""

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from sdcore import GenerationRequest


def test_single_file_loads_in_plain_diffusers_and_matches_sdcore(tiny_sd1_model, tiny_sd1_folder, sdcore_engine):
    prompt, seed, steps = "a red circle at the top left on a white background", 77, 4
    ours = sdcore_engine.generate(GenerationRequest(prompt=prompt, steps=steps, width=64, height=64,
                                                    sampler="Euler", seed=seed, cfg_scale=7.0)).images[0]
    pipe = StableDiffusionPipeline.from_single_file(str(tiny_sd1_model), config=str(tiny_sd1_folder),
                                                    safety_checker=None, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latent = 64 // pipe.vae_scale_factor
    noise = torch.randn((1, 4, latent, latent), generator=torch.Generator("cpu").manual_seed(seed))
    theirs = pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, height=64, width=64, latents=noise).images[0]
    difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert difference.max() <= 1, f"sdcore and diffusers differ by up to {difference.max()}"
