"""FCN8s semantic segmentation on Cityscapes: the library behind the DVC stages in `stages/`.

The map (a subpackage per concept; each stage's script in `stages/` parses its arguments and
calls one function here, which writes the stage's outputs):

    params        params.yaml → validated, typed sections; the names parameters may take
    fields        how a section declares a field; its type/range check and JSON Schema
    stage         what every stage script shares: logging, one-line errors, exit codes
    errors        FcnError (input problems: one line, exit 1), ParamsError, DataError
    model         the FCN family (32s, 16s, 8s) on a torchvision VGG backbone; ImageNet weights
    checkpoint    the checkpoint schema: save, load, load a model, resume check
    sources       the project files a module runs, and their digests (a run's code identity)
    synthetic     stage `synthesize`: a synthetic dataset in the exact Cityscapes layout
                  (the default data)
    class_weights stage `class_weights`: pixel histogram → enet / median-frequency weights
    decode        stage `decode`: train/val pairs as raw arrays the train loader memory-maps
    deploy        stage `deploy`: ONNX export (and its int8 copy) checked against PyTorch
                  with onnxruntime: agreement, val mIoU, latency
    quantize      static int8 quantisation (onnxruntime QDQ) for CPUs, calibrated one image
                  at a time; the same bytes for the same inputs
    outputs       the outputs that hold timings and machine figures (the rest are
                  byte-reproducible)
    metrics       mIoU / Dice / accuracy from confusion matrices (training curves)
    device        the device and precision parameters → torch device, dtype, autocast,
                  gradient scaler, the uint8 → input conversion; every torch.cuda call
    backends      TF32, deterministic algorithms, cuDNN autotuning: set as contexts that
                  restore them, and recorded (`compute.*` in the metrics)
    images        reading and writing image files, with one-line errors naming the file
    png           the fast PNG codec for label masks
    video         frame streams: a video file or folder of frames read lazily, MP4 (H.264)
                  written atomically (PyAV)
    atomic        atomic file and folder output (temporary + rename)
    lifetime      no process of a run outlives its owner (DVC, the shell, the stage, torchrun)
    threads       bounded read-ahead and write-behind threads

    cityscapes/   the dataset's own conventions, matching cityscapesScripts exactly
        labels      the 35-label table and lookups (labelId, trainId, color, category)
        layout      where files live: suffixes, paths, the stem (the only module naming them)
        annotations polygon annotation files: parse, validate, serialize
        scoring     the official pixel-level evaluator (class/category IoU and iIoU)
    masks/        stage `masks`: polygons → label masks
        render      one annotation → labelIds, labelTrainIds, color, instanceIds
        generate    the stage's work: every annotation, in worker processes, atomically
        agreement   comparison with masks shipped with the dataset, and its figure
    train/        stage `train`
        pairs       an image and its trainId mask: found, size-checked, decoded
        augment     seeded draws and the uint8 geometry (crop in source coordinates, resize,
                    flip) on the loader side
        photometric the colour jitter, batched on the training device
        data        datasets (PNG or decoded cache), seeded samplers, loader worker count
        loop        one epoch of training, one validation pass; optimizer, LR, loss
        distributed torchrun launch, process group, exact reductions
        fit         the run: resume, epochs or iterations, early stopping, checkpoints, DVCLive
        resume      a run's state folder outside DVC's outputs (keyed by parameter hash), its
                    lock, and publishing the final checkpoints to train.out
    predict/      stages `evaluate` and `export`: a trained model on whole images
        predictor   Predictor: whole or sliding windows, multi-scale/flip TTA, OOM fallback
        cli         `fcn-predict`: a folder of images, or a video, from anywhere
        evaluate    stage `evaluate`: scores, tables and plots
        export      stage `export`: server-ready predictions, zip, overlays, GIF, video
        visualize   colors, overlays, panels, heatmap, GIF frames
    analysis/     where and how sure a model is wrong (the evaluate stage's analysis)
        boundary    Boundary IoU (Cheng et al. 2021), trimap IoU by distance from an edge
        calibration ECE, reliability diagram, temperature scaling, confidence/entropy maps
        per_image   per-image rows (accuracy, mIoU, confusions) and per-city means
        gallery     the worst-k gallery: image | truth | prediction | errors | confidence
        evaluation  every per-image accumulator fed together, as val images stream past
    benchmark/    stage `benchmark`: inference latency, memory, FLOPs, utilisation
        plan        the protocol and the configurations a profile asks for
        capability  matmul rate, native precisions, the environment
        inputs      the benchmark's images and model
        worker      one configuration, timed in a fresh process
        run         every configuration, assembled; the fast path
        flops       analytic and counted FLOPs
        report      headline metrics, details JSON, CSV, figure, Markdown table
    gpucheck/     `python -m fcn.gpucheck`: the CUDA paths proven in a short GPU loan, and its
                  dry run (recording torch.cuda fakes) everywhere else; see its __init__
"""
