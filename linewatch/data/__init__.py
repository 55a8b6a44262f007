"""Image data: file I/O (:mod:`.images`), MVTec-layout data sets (:mod:`.mvtec`),
synthetic industrial surfaces (:mod:`.synth`) and test-time corruptions
(:mod:`.corrupt`)."""
