"""The rule on real people's photos: sexual images of a real, identifiable person are never made.

A job that starts from a photo someone uploaded (an InstantID face, the source
of a variation or an upscale) may show a real person who never agreed to it.
Such a job is refused when its prompt is sexual, and its images are withheld
when the NSFW classifier flags them, whatever the server's policy, the channel
or `safety_check` say. The bot's own earlier results are not uploaded photos.

The sexual signal is the prompt screen's own (`asks_for_sexual_content`), read the
same way (folded, look-alikes and split words included): one list, one matcher.
"""

from __future__ import annotations

REAL_PERSON_REFUSAL = (
    "This prompt was refused: it asks for sexual content, and this job starts from a photo of a real person. "
    "Sexual images of a real, identifiable person are never made, on any server, whatever its settings."
)
REAL_PERSON_WITHHELD = (
    "withheld: flagged as NSFW, and made from a photo of a real person. Sexual images of a real, identifiable "
    "person are never shown, whatever the server's policy, the channel or the safety check setting."
)

