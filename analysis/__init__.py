"""See why a merge works: spectra, similarities, attention decay, knockout, evaluation."""
