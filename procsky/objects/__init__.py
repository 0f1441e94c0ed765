"""The data release's catalogue: detection on coadds, deblending, measurement, forced
photometry and the ``object`` / ``forced_source`` tables (issue 21).

Steps, each a module of this package (a notebook can call them one by one):

* :mod:`procsky.objects.detection`: per-band and multiband detection on the coadds of a
  patch, footprints and peaks merged across bands, sky objects;
* :mod:`procsky.objects.deblend`: a scarlet-like multiband deblender;
* :mod:`procsky.objects.measure`: per-band measurement of the deblended children
  (and forced measurement at the reference band's positions and shapes);
* :mod:`procsky.objects.table`: the ``object`` table (band-prefixed columns in nJy,
  ``is_primary``) and the reference band;
* :mod:`procsky.objects.forced`: forced photometry on calexps and difference images.
"""
