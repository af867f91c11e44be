"""Importers: raw data in published formats -> boldjax datasets (`python -m boldjax.prepare
FORMAT`). One module per format, each registering ("importer", FORMAT): a class with `help`,
`add_arguments(parser)` and `run(args) -> output path`. A new format is a new module here
and one line in the import list below.

  webdataset             learning-from-brains / CortexMAE tar shards -> parcellated runs
  hdf5                   Brain-Semantoks HDF5 -> parcellated runs (457 ROIs, 9 networks)
  nifti                  4-D NIfTI + a label atlas -> parcel means
  cifti                  CIFTI-2 dtseries + a grayordinate parcellation -> parcel means
  nsd_flat               NSD-Flat parquet / arrow -> flat maps
  synthetic_flat         the embedded synthetic flat maps
  synthetic_parcellated  the embedded synthetic parcellated runs
  images                 a folder of PNG/JPEG -> image stimuli
  nsd_images             NSD's nsd_stimuli.hdf5 brick -> image stimuli
  nsd_betas              NSD single-trial betas + design + brick -> trials (fmri2img)
  synthetic_images       the embedded synthetic image stimuli
  algonauts              Algonauts 2023 subject folder -> image stimuli + fsaverage responses

Every parcellated importer scans subjects first, splits them subject-wise (seeded; val/test
fractions), then streams records into bold_records.build_bold_dataset, which refuses
NaN/Inf frames, a wrong R and runs shorter than seq_min. Errors name the file, the field,
the expected and the found value.
"""

from boldjax.data.importers import (  # noqa: F401  (registration)
  algonauts,
  cifti,
  hdf5,
  images,
  nifti,
  nsd_betas,
  nsd_flat,
  synthetic,
  webdataset,
)
