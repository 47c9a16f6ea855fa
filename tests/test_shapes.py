"""The procedural dataset: reproducible, balanced, in range, and the classes really differ."""

import torch

from tofu_diffusion.pipelines.shapes import CLASSES, generate


def test_reproducible_from_seed():
    a, la = generate(16, seed=3)
    b, lb = generate(16, seed=3)
    c, _ = generate(16, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (16, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_classes_are_balanced_and_distinct():
    images, labels = generate(1200, seed=0)
    counts = torch.bincount(labels, minlength=len(CLASSES))
    assert counts.min() > 150  # about 200 each
    # at the same placement, every pair of shapes covers clearly different pixels
    from tofu_diffusion.pipelines.shapes import _shape_masks

    coords = (torch.arange(64) + 0.5) / 64 * 2.4 - 1.2
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    masks = [_shape_masks(torch.tensor([k]), u[None], v[None])[0] for k in range(len(CLASSES))]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.8, (CLASSES[i], CLASSES[j], float(iou))


def test_images_have_texture_not_flat_colour():
    images, _ = generate(64, seed=1)
    # neighbouring pixels differ (noise, stripes, edges): no flat single-colour pictures
    horizontal = (images[..., 1:] - images[..., :-1]).abs().mean(dim=(1, 2, 3))
    assert (horizontal > 0.02).all()


def test_clips_move_one_shape_at_constant_velocity():
    from tofu_diffusion.pipelines.shapes import generate_clips

    clips, labels, centres = generate_clips(16, seed=3)
    assert clips.shape == (16, 8, 3, 32, 32) and labels.shape == (16,) and centres.shape == (16, 8, 2)
    steps = centres[:, 1:] - centres[:, :-1]
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-6)  # the same displacement every frame
    assert centres.abs().max() < 1
    again = generate_clips(16, seed=3)[0]
    assert torch.equal(clips, again) and not torch.equal(clips, generate_clips(16, seed=4)[0])
    # the shipped classifier, trained on stills, recognises the clips' frames
    from tofu_diffusion.pipelines import load_shapes_classifier

    with torch.no_grad():
        predicted = load_shapes_classifier()(clips.flatten(0, 1)).argmax(1)
    assert (predicted == labels.repeat_interleave(8)).float().mean() > 0.9
