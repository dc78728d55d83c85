"""ReconstructionModuleLib: PET reconstruction, low-dose simulation, multi-center data generator, SR4ZCT.

Engine package (torch / numpy / scipy / SimpleITK only).  Arrays are in SimpleITK order: images (z, y, x),
sinograms (z, views, bins).  Long functions take ``progress(fraction, message)`` and ``cancel()`` and raise
``PETWorkbenchLib.errors.InputError`` for bad input.

System model and reconstruction
-------------------------------
``projector.ParallelProjector(nx, ny, pixel_mm, n_angles=None, n_bins=None, n_subsets=1, bin_positions_mm=None,
device="cpu")``
    2D multi-slice Joseph projector stored as sparse CSR matrices; ``forward(img, subset=None)`` and its exact
    adjoint ``back(sino, subset=None)``.
``projector.PETSystem(shape, spacing_zyx, psf_fwhm_mm=0, mu=None, norm=None, n_subsets=1, ...)``
    ybar = norm * exp(-A mu) * A(G x); ``forward``/``back`` (exact adjoint pair), ``sino_shape``.
``osem.osem(system, prompts, additive=None, n_iter=3, post_filter_fwhm_mm=0, sens=None, progress, cancel)``
    OSEM (``osem.mlem`` = one subset); ``additive`` = randoms + scatter estimate.
``io.reconstruct_sinogram_file(path.npz, out.nii.gz, n_iter, n_subsets, psf_fwhm_mm, post_filter_mm)``
    reconstruct a sinogram container written by ``io.save_sinogram``.

Low dose
--------
``lowdose.thin_counts(counts, drf, seed)``: binomial thinning (DRMC's way of making low-dose data);
``lowdose.poisson_sample(mean, seed)``.
``imagedomain.simulate_lowdose_image(pet_image, drf, ct=None, counts_per_cm=2e6, psf_fwhm_mm=4, n_iter=3,
n_subsets=8, seed=0) -> {"low_dose": Image, "full_dose": Image, "prompts", "prompts_low"}``
    for users with only a reconstructed image: project, Poisson, thin, reconstruct both with the same OSEM.

List-mode (Siemens mMR PETLINK)
-------------------------------
``listmode.read_listmode(path)`` (``.l`` or ``.l.hdr``) -> prompts/delays bin addresses, time tags;
``listmode.histogram(lm, time_window_s=None, axial_rebin=1, view_mash=1, bin_mash=1)`` -> prompts, delays,
net (prompts - delays) SSRB sinograms; ``listmode.reconstruct_listmode(lm, time_window_s=None, ...)`` ->
{"image": Image, "histogram": ...}; ``listmode.reconstruct_listmode_file(path, out, time_window_s)``.

Data generator
--------------
``simulate.CENTERS`` (DRMC Table 1 profiles C1..C6), ``simulate.SUV_TABLE`` (FDG, FAPI organ SUVs),
``simulate.hu_to_mu(hu)`` (bilinear HU -> 1/mm at 511 keV),
``simulate.generate_dataset(out_dir, n_patients, centers=None, tracers=("FDG",), extra_drfs=(20,), seed=0,
progress=None, cancel=None, n_test=None, n_unknown=None, second_tracer_every=1, max_slices=110,
max_voxels=2.5e6) -> Path(manifest.csv)``; ``simulate.generate_standard_set(out_dir)``.
Per case: full_dose, low_dose (centre DRF), low_dose_drf20, ct, labels (LDOS-18, see ``organs.LDOS_ORGANS``),
lesions (instance labels), suv_true (noise-free truth); manifest.csv columns ``simulate.MANIFEST_COLUMNS``.

SR4ZCT
------
``sr4zct.sr4zct(ct_image, out_spacing_z=None, thickness_mm=None, epochs=60, depth=5, seed=0,
max_seconds=None, network="cnn") -> (Image, info)``: self-supervised through-plane enhancement;
``info["thickness_source"]`` says whether the slice thickness came from the argument, the DICOM metadata or the spacing.
``sr4zct.sr4zct_array(vol, r_xy, r_z, o_z, epochs, network="msd"|"cnn", depth, lr, batch, patch, max_seconds)``
for arrays (the benchmark uses network="cnn", depth=5, lr=2e-3, patch=48, 60 epochs).
``sr4zct.thick_slice_volume``, ``sr4zct.cubic_upsample``, ``sr4zct.psnr`` reproduce the evaluation.

Command line (``cli.add_commands``): ``simulate``, ``reconstruct``, ``lowdose``, ``sr4zct``, ``listmode``.
"""
