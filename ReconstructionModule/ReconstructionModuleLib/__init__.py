"""ReconstructionModuleLib: PET reconstruction engine (placeholder docstring, completed below)."""
