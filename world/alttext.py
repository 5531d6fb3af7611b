"""Web alt-text: a documented, tunable model of how bad the text of a web image–text pool is.

Every pool sample's ``text`` is drawn from one *kind* (recorded as ``text_kind`` in
``truth.parquet``):

==============  ==============================================================================
kind            what the text is
==============  ==============================================================================
faithful        a correct but web-style description: classes and some attributes, rarely
                positions ("Large red star and two blue circles on grass")
partial         one object named, no attributes ("star shape", "picture of a star")
wrong_attr      every object named, but with a wrong colour (and sometimes size or count)
seo             SEO boilerplate, sometimes with one object word in it
                ("Buy Red Star Wall Sticker Online | Free Shipping | Best Price 2019")
filename        a file name ("IMG_2034.JPG", "DSC_0482.jpg", "Screenshot 2019-04-12 at …")
mismatch        a caption of another image (the alt-text of a neighbouring image on the page)
non_english     a caption in German, French, Spanish, Italian, Portuguese or Dutch
empty           the empty string
one_word        one word ("image", "logo", "untitled", or one class name)
clean           a human-quality caption (the ``clean`` noise preset: a pool with good text)
==============  ==============================================================================

Default rates (preset ``web``) and where they come from. They are chosen to sit inside what
published analyses of web alt-text report; they are not measured on CommonPool itself, and
every one of them can be set (``--text-mix kind=rate,...``; the kinds not named keep their
preset proportions of what is left):

- non_english 0.35, and filename + one_word + empty 0.14: LAION-5B (Schuhmann et al., NeurIPS
  2022 Datasets & Benchmarks, arXiv 2210.08402) reports, of its 5.85B CLIP-filtered pairs,
  2.32B English, 2.26B in 100+ other languages and about 1.27B whose text allows no language
  assignment (names, codes, file names) — about 40 / 39 / 22 %. That is *after* CLIP
  filtering, which removes most empty and file-name texts, so unfiltered pools (DataComp's
  CommonPool, Gadre et al., NeurIPS 2023, arXiv 2304.14108, built with LAION's recipe but
  without the CLIP filter) have at least as much non-English and no-language text.
- filename 0.05, empty 0.03: the WebAIM Million accessibility reports (yearly, 1M home pages)
  find missing alt text on over half of home pages and list file names ("DSC_0482.jpg",
  "IMG_…") and generic words ("image", "graphic") among the commonest questionable
  alternatives; crawlers such as LAION's drop images with no alt attribute at all, so empty
  strings are rarer in a pool than on pages.
- one_word 0.06: DataComp's basic filter drops captions of two words or fewer or five
  characters or fewer; together with its English and image-size rules it keeps only about a
  quarter of the small pool (Gadre et al. 2023), so very short texts are common.
- mismatch 0.08, wrong_attr 0.07, seo 0.08, partial 0.15: LAION-400M (Schuhmann et al. 2021,
  arXiv 2111.02114) kept a pair only when its CLIP similarity reached 0.3, a threshold set by
  human inspection of how often alt-text fails to describe the image; Nguyen et al.
  ("Improving Multimodal Datasets with Image Captioning", NeurIPS 2023, arXiv 2307.10350)
  find raw web captions frequently uninformative (generic, boilerplate, unrelated), and
  *CLIP with Quality Captions* (Vasu et al. 2024, arXiv 2405.08911) rests on the observation
  that web alt-text is poorly aligned with image content. The split between these four is our
  choice: most English alt-text names something in the image but little about it.
- faithful: the rest (0.13).

Presets: ``web`` (above), ``harsh`` (a worse crawl: more non-English, mismatched and SEO
text), ``clean`` (every pool text a human-quality caption: the upper bound).
"""

from __future__ import annotations

import numpy as np

from world.describe import (
    COUNT_TEXT,
    PLURALS,
    POSITION_PHRASE,
    Group,
    article,
    clean_captions,
    groups_of,
)
from world.scenes import CLASSES, COLOURS, SIZES, Scene

TEXT_KINDS: tuple[str, ...] = (
    "faithful", "partial", "wrong_attr", "seo", "filename", "mismatch", "non_english", "empty", "one_word", "clean",
)
# The kind that takes whatever probability the named rates leave over.
REMAINDER_KIND = {"web": "faithful", "harsh": "faithful", "clean": "clean"}
NOISE_PRESETS: dict[str, dict[str, float]] = {
    "web": {
        "non_english": 0.35, "filename": 0.05, "one_word": 0.06, "empty": 0.03, "seo": 0.08, "mismatch": 0.08,
        "wrong_attr": 0.07, "partial": 0.15,
    },
    "harsh": {
        "non_english": 0.40, "filename": 0.08, "one_word": 0.08, "empty": 0.05, "seo": 0.12, "mismatch": 0.12,
        "wrong_attr": 0.08, "partial": 0.05,
    },
    "clean": {},
}
LANGUAGES: tuple[str, ...] = ("de", "fr", "es", "it", "pt", "nl")


def text_rates(noise: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Probabilities of every text kind for a preset plus overrides (they sum to 1).

    Overridden kinds get exactly the rate given; the preset's other kinds (the remainder kind
    included) share what is left in their preset proportions.
    """
    if noise not in NOISE_PRESETS:
        raise ValueError(f"noise: unknown preset {noise!r}; choose from {sorted(NOISE_PRESETS)}")
    overrides = dict(overrides or {})
    for kind, rate in overrides.items():
        if kind not in TEXT_KINDS:
            raise ValueError(f"text_mix: unknown text kind {kind!r}; choose from {list(TEXT_KINDS)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"text_mix: rate of {kind!r} must be in [0, 1], got {rate}")
    preset = dict(NOISE_PRESETS[noise])
    remainder = REMAINDER_KIND[noise]
    preset[remainder] = max(0.0, 1.0 - sum(preset.values()))
    fixed = sum(overrides.values())
    if fixed > 1.0 + 1e-9:
        raise ValueError(f"text_mix: rates sum to {fixed:.4f} > 1; lower some")
    others = {k: v for k, v in preset.items() if k not in overrides and v > 0}
    if fixed < 1.0 - 1e-9 and not others:
        raise ValueError(f"text_mix: rates sum to {fixed:.4f} < 1 and no other kind is left to take the rest")
    scale = (1.0 - fixed) / sum(others.values()) if others else 0.0
    rates = {**{k: v * scale for k, v in others.items()}, **overrides}
    return {k: round(float(rates.get(k, 0.0)), 6) for k in TEXT_KINDS}


def parse_text_mix(spec: str | None) -> dict[str, float]:
    """``"partial=0.2,seo=0.1"`` → ``{"partial": 0.2, "seo": 0.1}``."""
    out: dict[str, float] = {}
    if not spec:
        return out
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"text_mix: {part!r} is not kind=rate")
        kind, value = part.split("=", 1)
        try:
            out[kind.strip()] = float(value)
        except ValueError as err:
            raise ValueError(f"text_mix: rate {value!r} of {kind.strip()!r} is not a number") from err
    return out


def draw_kind(rng: np.random.Generator, rates: dict[str, float]) -> str:
    kinds = [k for k in TEXT_KINDS if rates.get(k, 0.0) > 0]
    probs = np.array([rates[k] for k in kinds], dtype=float)
    return kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]


def alt_text(
    kind: str, scene: Scene, rng: np.random.Generator, other: Scene | None = None, *,
    colours: tuple[str, ...] | None = None,
) -> tuple[str, str]:
    """(text, language) of one kind for a scene; ``other`` is the scene a mismatch describes.

    ``colours``: the colours the world's scenes draw from (its palette; default all of
    :data:`~world.scenes.COLOURS`), the ones a wrong attribute or SEO text names instead of the true one.
    """
    writer = _WRITERS[kind]
    palette = tuple(colours) if colours else tuple(COLOURS)
    if kind == "mismatch":
        if other is None:
            raise ValueError("a mismatch caption needs the other image's scene")
        return writer(other, rng, palette)
    return writer(scene, rng, palette)


# --------------------------------------------------------------------------------------------
# English web text

_WEB_BG = {
    "sky": ["on blue sky", "sky background", "against the sky"],
    "grass": ["on grass", "on green grass", "grass background"],
    "sand": ["on sand", "sand background", "on the beach"],
    "wood": ["on wooden background", "on wood", "wood texture background"],
    "brick": ["on brick wall", "brick wall background", "against a brick wall"],
    "studio": ["isolated", "studio shot", "on studio backdrop"],
    "night": ["at night", "night sky background", "on a starry night"],
}


def _case(rng: np.random.Generator, text: str) -> str:
    style = rng.random()
    if style < 0.35:
        return text.lower()
    if style < 0.6:
        return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    return text[:1].upper() + text[1:]


def _web_np(g: Group, rng: np.random.Generator, *, colour: str | None = None, size: str | None = None, count: int | None = None) -> str:
    colour = colour or g.colour
    count = g.count if count is None else count
    words = []
    if size is not None or rng.random() < 0.3:
        words.append(size or g.size)
    words.append(colour)
    if g.texture != "solid" and rng.random() < 0.3:
        words.append(g.texture)
    words.append(g.cls if count == 1 else PLURALS[g.cls])
    det = ("" if rng.random() < 0.5 else article(words[0]) + " ") if count == 1 else COUNT_TEXT[count] + " "
    return det + " ".join(words)


def _web_caption(scene: Scene, rng: np.random.Generator, *, errors: bool = False, colours: tuple[str, ...]) -> str:
    """Web-style text naming every group; ``errors``: one group's attributes wrong (a colour from ``colours``)."""
    groups = groups_of(scene)
    order = [groups[int(i)] for i in rng.permutation(len(groups))]
    wrong = int(rng.integers(len(order))) if errors else -1
    parts = []
    for i, g in enumerate(order):
        if i == wrong:
            colour = _other(rng, colours, g.colour)
            size = _other(rng, SIZES, g.size) if rng.random() < 0.4 else None
            count = _other(rng, (1, 2, 3, 4), g.count) if rng.random() < 0.3 else None
            parts.append(_web_np(g, rng, colour=colour, size=size, count=count))
        else:
            parts.append(_web_np(g, rng))
        if rng.random() < 0.15:
            parts[-1] += " " + POSITION_PHRASE[g.positions[0]]
    text = " and ".join(parts)
    if rng.random() < 0.6:
        options = _WEB_BG[scene.background]
        text += " " + options[int(rng.integers(len(options)))]
    return _case(rng, text)


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _faithful(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    return _web_caption(scene, rng, colours=colours), "en"


def _wrong_attr(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    return _web_caption(scene, rng, errors=True, colours=colours), "en"


def _mismatch(other: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    return _web_caption(other, rng, colours=colours), "en"


_PARTIAL = ["{c}", "{a} {c}", "{c} shape", "{c} icon", "picture of a {c}", "{c} clipart", "{c} vector illustration",
            "the {c}", "simple {c} design", "{c} symbol on a page"]


def _one_class(scene: Scene, rng: np.random.Generator) -> str:
    return scene.objects[int(rng.integers(len(scene.objects)))].cls


def _partial(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    cls = _one_class(scene, rng)
    template = _PARTIAL[int(rng.integers(len(_PARTIAL)))]
    return _case(rng, template.format(c=cls, a=article(cls))), "en"


_SEO = [
    "Buy {C} {K} Wall Sticker Online | Free Shipping | Best Price {y}",
    "{K} Stock Photos and Royalty Free Images - Page {n}",
    "Cheap {c} {k} decor for sale - top rated {y} deals",
    "Download free HD wallpaper #{n} | 4K backgrounds for desktop and mobile",
    "Click here to see more {k} designs on our website",
    "Home Decor Ideas {y}: {n} Best {C} {K} Prints You Can Buy Now",
    "{C} {K} Logo Vector - Free Download (SVG, PNG, EPS)",
    "Royalty-free stock image {n} - high resolution, instant download",
    "Shop now and save 20% | {K} collection | New arrivals {y}",
]


def _seo(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    colour = obj.colour if rng.random() < 0.5 else _other(rng, colours, obj.colour)
    template = _SEO[int(rng.integers(len(_SEO)))]
    text = template.format(
        c=colour, C=colour.capitalize(), k=obj.cls, K=obj.cls.capitalize(), y=int(rng.integers(2009, 2024)),
        n=int(rng.integers(2, 99999)),
    )
    return text, "en"


def _filename(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    n = int(rng.integers(0, 100000))
    forms = [
        f"IMG_{n % 10000:04d}.JPG",
        f"DSC_{n % 10000:04d}.jpg",
        f"DSC{n:05d}.JPG",
        f"image-{n % 3000}.png",
        f"photo ({n % 40}).jpeg",
        f"Screenshot 20{10 + n % 14}-{1 + n % 12:02d}-{1 + n % 28:02d} at {n % 24}.{n % 60:02d}.{(n * 7) % 60:02d}.png",
        f"{rng.integers(0, 2**40):010x}.jpg",
        f"banner_v{1 + n % 5}_final.png",
        f"thumb_{150 + n % 200}x{150 + n % 200}.jpg",
        f"{_one_class(scene, rng)}_{n % 1000:03d}.jpg",
    ]
    return forms[int(rng.integers(len(forms)))], "und"


def _empty(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    return "", "und"


_ONE_WORD = ["image", "photo", "picture", "untitled", "logo", "banner", "thumbnail", "img", "default", "icon", "placeholder"]


def _one_word(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    if rng.random() < 0.3:
        return _case(rng, _one_class(scene, rng)), "en"
    return _ONE_WORD[int(rng.integers(len(_ONE_WORD)))], "en"


def _clean(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    return clean_captions(scene, rng, num=1)[0], "en"


# --------------------------------------------------------------------------------------------
# Non-English web text: object words and colours per language (gender where adjectives agree)

# class → (noun, gender)
_NOUNS: dict[str, dict[str, tuple[str, str]]] = {
    "de": {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"), "star": ("Stern", "m"),
           "heart": ("Herz", "n"), "cross": ("Kreuz", "n"), "crescent": ("Halbmond", "m"), "hexagon": ("Sechseck", "n"),
           "ring": ("Ring", "m"), "arrow": ("Pfeil", "m")},
    "fr": {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"), "star": ("étoile", "f"),
           "heart": ("cœur", "m"), "cross": ("croix", "f"), "crescent": ("croissant", "m"), "hexagon": ("hexagone", "m"),
           "ring": ("anneau", "m"), "arrow": ("flèche", "f")},
    "es": {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"), "star": ("estrella", "f"),
           "heart": ("corazón", "m"), "cross": ("cruz", "f"), "crescent": ("media luna", "f"), "hexagon": ("hexágono", "m"),
           "ring": ("anillo", "m"), "arrow": ("flecha", "f")},
    "it": {"circle": ("cerchio", "m"), "square": ("quadrato", "m"), "triangle": ("triangolo", "m"), "star": ("stella", "f"),
           "heart": ("cuore", "m"), "cross": ("croce", "f"), "crescent": ("mezzaluna", "f"), "hexagon": ("esagono", "m"),
           "ring": ("anello", "m"), "arrow": ("freccia", "f")},
    "pt": {"circle": ("círculo", "m"), "square": ("quadrado", "m"), "triangle": ("triângulo", "m"), "star": ("estrela", "f"),
           "heart": ("coração", "m"), "cross": ("cruz", "f"), "crescent": ("lua crescente", "f"), "hexagon": ("hexágono", "m"),
           "ring": ("anel", "m"), "arrow": ("seta", "f")},
    "nl": {"circle": ("cirkel", "c"), "square": ("vierkant", "n"), "triangle": ("driehoek", "c"), "star": ("ster", "c"),
           "heart": ("hart", "n"), "cross": ("kruis", "n"), "crescent": ("halve maan", "c"), "hexagon": ("zeshoek", "c"),
           "ring": ("ring", "c"), "arrow": ("pijl", "c")},
}
# colour → (masculine/common form, feminine form)
_COLOURS: dict[str, dict[str, tuple[str, str]]] = {
    "de": {c: (w, w) for c, w in {"red": "Rot", "orange": "Orange", "yellow": "Gelb", "green": "Grün", "blue": "Blau",
                                   "purple": "Lila", "pink": "Rosa", "brown": "Braun", "black": "Schwarz", "white": "Weiß",
                                   "grey": "Grau"}.items()},
    "fr": {"red": ("rouge", "rouge"), "orange": ("orange", "orange"), "yellow": ("jaune", "jaune"), "green": ("vert", "verte"),
           "blue": ("bleu", "bleue"), "purple": ("violet", "violette"), "pink": ("rose", "rose"), "brown": ("marron", "marron"),
           "black": ("noir", "noire"), "white": ("blanc", "blanche"), "grey": ("gris", "grise")},
    "es": {"red": ("rojo", "roja"), "orange": ("naranja", "naranja"), "yellow": ("amarillo", "amarilla"),
           "green": ("verde", "verde"), "blue": ("azul", "azul"), "purple": ("morado", "morada"), "pink": ("rosa", "rosa"),
           "brown": ("marrón", "marrón"), "black": ("negro", "negra"), "white": ("blanco", "blanca"), "grey": ("gris", "gris")},
    "it": {"red": ("rosso", "rossa"), "orange": ("arancione", "arancione"), "yellow": ("giallo", "gialla"),
           "green": ("verde", "verde"), "blue": ("blu", "blu"), "purple": ("viola", "viola"), "pink": ("rosa", "rosa"),
           "brown": ("marrone", "marrone"), "black": ("nero", "nera"), "white": ("bianco", "bianca"),
           "grey": ("grigio", "grigia")},
    "pt": {"red": ("vermelho", "vermelha"), "orange": ("laranja", "laranja"), "yellow": ("amarelo", "amarela"),
           "green": ("verde", "verde"), "blue": ("azul", "azul"), "purple": ("roxo", "roxa"), "pink": ("rosa", "rosa"),
           "brown": ("marrom", "marrom"), "black": ("preto", "preta"), "white": ("branco", "branca"), "grey": ("cinza", "cinza")},
    "nl": {"red": ("rode", "rode"), "orange": ("oranje", "oranje"), "yellow": ("gele", "gele"), "green": ("groene", "groene"),
           "blue": ("blauwe", "blauwe"), "purple": ("paarse", "paarse"), "pink": ("roze", "roze"), "brown": ("bruine", "bruine"),
           "black": ("zwarte", "zwarte"), "white": ("witte", "witte"), "grey": ("grijze", "grijze")},
}
_TEMPLATES: dict[str, list[str]] = {
    "de": ["Ein Bild mit {a} und {b} auf dem Hintergrund", "{a} – hier günstig online kaufen, schnelle Lieferung",
           "Foto: {a} vor einem schönen Hintergrund, kostenlos herunterladen"],
    "fr": ["Une image avec {a} et {b} sur le fond", "{a} – livraison gratuite dans toute la France",
           "Photo d'{a} à télécharger gratuitement pour votre site"],
    "es": ["Una imagen con {a} y {b} sobre el fondo", "{a} – envío gratis a toda España en pedidos",
           "Foto de {a} para descargar gratis en alta calidad"],
    "it": ["Un'immagine con {a} e {b} sullo sfondo", "{a} – spedizione gratuita in tutta Italia",
           "Foto di {a} da scaricare gratis per il tuo sito"],
    "pt": ["Uma imagem com {a} e {b} sobre o fundo", "{a} – frete grátis para todo o Brasil nas compras",
           "Foto de {a} para baixar grátis em alta qualidade"],
    "nl": ["Een afbeelding met {a} en {b} op de achtergrond", "{a} – gratis verzending in heel Nederland",
           "Foto van {a} om gratis te downloaden voor je website"],
}


def _foreign_np(lang: str, cls: str, colour: str) -> str:
    noun, gender = _NOUNS[lang][cls]
    masc, fem = _COLOURS[lang][colour]
    if lang == "de":
        return f"{noun} in {masc}"
    if lang == "nl":
        return f"een {masc} {noun}"
    adj = fem if gender == "f" else masc
    art = {"fr": ("un", "une"), "es": ("un", "una"), "it": ("un", "una"), "pt": ("um", "uma")}[lang]
    det = art[1] if gender == "f" else art[0]
    return f"{det} {noun} {adj}"


def _non_english(scene: Scene, rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    lang = LANGUAGES[int(rng.integers(len(LANGUAGES)))]
    objs = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    a = _foreign_np(lang, objs[0].cls, objs[0].colour)
    other = next((o for o in objs[1:] if (o.cls, o.colour) != (objs[0].cls, objs[0].colour)), None)
    templates = _TEMPLATES[lang]
    template = templates[int(rng.integers(len(templates)))] if other is not None else templates[1 + int(rng.integers(2))]
    b = _foreign_np(lang, other.cls, other.colour) if other is not None else ""
    text = template.format(a=a, b=b)
    return text[:1].upper() + text[1:], lang


_WRITERS = {
    "faithful": _faithful,
    "partial": _partial,
    "wrong_attr": _wrong_attr,
    "seo": _seo,
    "filename": _filename,
    "mismatch": _mismatch,
    "non_english": _non_english,
    "empty": _empty,
    "one_word": _one_word,
    "clean": _clean,
}
assert set(_WRITERS) == set(TEXT_KINDS)
assert all(set(v) == set(CLASSES) for v in _NOUNS.values())
