"""Built-in dataset sources. Listing plugins imports this module, so it stays free of torch (and of PIL)."""

from pydantic import Field

from prefixcap.hookspecs import hookimpl
from prefixcap.registry import ComponentOptions


class ShapesOptions(ComponentOptions):
    # The default world of prefixcap: no caption dataset or model hub can be reached offline or in CI, so the
    # quickstart trains on generated scenes whose captions an exact oracle can check (prefixcap.data.shapes).
    image_size: int = Field(64, ge=32, le=512, description="side of the square RGB images, in pixels")
    train_size: int = Field(2000, ge=1, le=10_000_000)
    val_size: int = Field(200, ge=0, le=10_000_000)
    test_size: int = Field(200, ge=0, le=10_000_000)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="one seed for all splits; each split has its own stream")
    max_shapes: int = Field(3, ge=1, le=3, description="shapes per image are drawn uniformly from 1..max_shapes")
    sizes: bool = Field(False, description="draw small and large shapes, and name the size in the captions")
    noise: float = Field(0.0, ge=0, le=1, description="grain on the background (0: plain); shapes keep their colour")


class JsonlOptions(ComponentOptions):
    # One JSON Lines file per split: {"image": "relative/or/absolute/path.jpg", "captions": ["...", "..."]}
    train: str = Field(description="JSON Lines file of the training split")
    val: str | None = None
    test: str | None = None
    image_field: str = "image"
    caption_field: str = Field("captions", description="a string, or a list of reference captions")


class HFOptions(ComponentOptions):
    # A hub id (e.g. a Flickr8k/Flickr30k-style set), a save_to_disk directory, or an image folder.
    path: str
    config: str | None = None
    revision: str | None = None
    image_column: str = "image"
    caption_column: str | list[str] = Field(
        "caption", description="a column of one caption or a list of references; or several columns, one each"
    )
    train: str = "train"  # the dataset's names for our splits
    val: str | None = "validation"
    test: str | None = "test"
    streaming: bool = False


@hookimpl
def register_datasets(register):
    register("shapes", factory="prefixcap.data.shapes:ShapesSource", options=ShapesOptions,
             description="Offline world: 1-3 coloured shapes left to right, exact captions and a parser to score them")
    register("jsonl", factory="prefixcap.data.sources:JsonlSource", options=JsonlOptions,
             description="Your own data: JSON Lines files of image paths and one or more captions each")
    register("hf", factory="prefixcap.data.sources:HFSource", options=HFOptions,
             description="Any Hugging Face datasets set: hub id, save_to_disk directory or image folder")
