"""`latent-stream adapt`: a bundle fitted on a beamline's own recorded frames, on a serving install (no torch)."""
