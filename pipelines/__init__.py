"""What users call: the text-to-image pipeline and the `dallekit` command line."""

from pipelines.text_to_image import TextToImageOutput, TextToImagePipeline

__all__ = ["TextToImageOutput", "TextToImagePipeline"]
