"""Self-contained HTML pages of image cards with boxes drawn on them (`cogtune preview`, prediction reports).

One file, nothing fetched: CSS and a few lines of vanilla JavaScript inline, images as JPEG `data:` URLs.
Cards are stored as JSON and only the current page is put into the DOM, so a file of 10k rows opens
quickly; identical images are stored once. Boxes are an SVG laid over the image whose viewBox is the
image's own pixel size, so a box is drawn at exactly the pixels `data_formats.boxes.from_cog` gives:
the same proportions the model reads (it sees the image resized, and box values are proportions).
No torch here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_formats.boxes import Box, from_cog, parse_boxes

from .fileio import write_atomic

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), one per phrase.
PALETTE: tuple[str, ...] = ("#d55e00", "#0072b2", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7a3cff", "#b8860b")
STROKE_PX = 3  # box line width in screen pixels, whatever the image scale
DISPLAY_PX = 360  # largest side of an image on a card, in CSS pixels
SMALL_PX = 240  # images smaller than this are shown enlarged (integer factor, pixels kept sharp)

# A `[[...]]` group, optionally CogAgent's `box=` prefix; `parse_boxes` decides whether it holds boxes.
_BOX_TEXT_RE = re.compile(r"(box=)?\[\[.*?\]\]", re.S)


def esc(text: Any) -> str:
    """HTML-escaped text (quotes too: used in attributes)."""
    return html.escape(str(text), quote=True)


# --------------------------------------------------------------------------------------------------
# Boxes in text
# --------------------------------------------------------------------------------------------------


@dataclass
class BoxText:
    """One `[[...]]` group in a text: where it is, its boxes (000-999) and whether it was `box=[[...]]`."""

    start: int
    end: int
    boxes: list[Box]
    action: bool = False


def find_box_texts(text: str) -> list[BoxText]:
    """Every box group written in `text`, in order (same parser as validation and scoring)."""
    found = []
    for m in _BOX_TEXT_RE.finditer(text):
        groups = parse_boxes(m.group(0))
        if groups:
            found.append(BoxText(m.start(), m.end(), [b for g in groups for b in g], bool(m.group(1))))
    return found


def phrase_before(text: str, start: int, words: int = 4) -> str:
    """The phrase a box refers to: the last few words before it, back to the previous box or sentence end.

    Grounding answers write `a cat[[...]] on a sofa[[...]]`; CogAgent writes `CLICK(box=[[...]],
    element_info='Search')`, for which the action and the element name are returned.
    """
    before = re.split(r"[.!?\n;:]|\]\]", text[:start])[-1].strip(" ,([=\t")
    phrase = " ".join(before.split()[-words:])
    after = re.match(r"[^\n]{0,40}?element_info\s*=\s*['\"]([^'\"]{1,60})['\"]", text[start:])
    if after:
        phrase = f"{phrase} {after.group(1)}".strip()
    return phrase


def mark_boxes(text: str, colour_of: Callable[[int, list[Box]], str] | None = None) -> tuple[str, int]:
    """Escaped `text` with each box group in a chip; `colour_of(index, boxes)` picks its colour.

    Returns (html, number of groups). Default colours: the palette in order of appearance.
    """
    out, pos, n = [], 0, 0
    for bt in find_box_texts(text):
        colour = colour_of(n, bt.boxes) if colour_of else PALETTE[n % len(PALETTE)]
        chip = esc(text[bt.start:bt.end])
        out.append(esc(text[pos:bt.start]))
        out.append(f'<span class="bx" style="border-color:{colour};color:{colour}">{chip}</span>')
        pos, n = bt.end, n + 1
    out.append(esc(text[pos:]))
    return "".join(out), n


# --------------------------------------------------------------------------------------------------
# Images and figures
# --------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """A box to draw, in 000-999 Cog values (what the model reads/writes), with its colour and label."""

    box: Sequence[float]
    colour: str
    label: str = ""
    point: bool = False  # also mark the centre (CogAgent's click point)
    width: int = STROKE_PX  # line width in screen pixels
    below: bool = False  # label under the box (keeps two box sets' labels apart)


@dataclass
class Thumb:
    """An image reduced for a card: key into the page's image table, original size, or why it failed."""

    key: int | None
    size: tuple[int, int] | None
    error: str = ""


class ImageTable:
    """JPEG `data:` URLs of the page's images, each stored once however many cards show it."""

    def __init__(self, max_side: int = DISPLAY_PX, quality: int = 82) -> None:
        self.max_side, self.quality = max_side, quality
        self.urls: list[str] = []
        self._by_ref: dict[str, Thumb] = {}

    def add(self, ref: str) -> Thumb:
        """Thumbnail of `ref` (path or data: URL); a missing or broken image gives a Thumb with `error`."""
        if ref in self._by_ref:
            return self._by_ref[ref]
        from data_formats.schema import ImageError, load_image

        try:
            im = load_image(ref)
        except ImageError as exc:
            self._by_ref[ref] = Thumb(None, None, str(exc))
            return self._by_ref[ref]
        return self.add_image(ref, im)

    def add_image(self, ref: str, im: Any) -> Thumb:
        """Thumbnail of a decoded PIL image (a video frame), stored once under `ref`."""
        if ref in self._by_ref:
            return self._by_ref[ref]
        size = im.size
        if max(size) > self.max_side:
            im = im.copy()
            im.thumbnail((self.max_side, self.max_side))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=self.quality)
        self.urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
        self._by_ref[ref] = thumb = Thumb(len(self.urls) - 1, size)
        return thumb


def display_size(size: tuple[int, int]) -> tuple[int, int]:
    """CSS size of an image on a card: fit in DISPLAY_PX, small images enlarged by an integer factor."""
    w, h = size
    if max(w, h) > DISPLAY_PX:
        s = DISPLAY_PX / max(w, h)
        return max(1, round(w * s)), max(1, round(h * s))
    k = max(1, SMALL_PX // max(w, h))
    return w * k, h * k


def box_pixels(box: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixels (x0, y0, x1, y1) of a 000-999 box on an image of `size`: `from_cog`, ordered and kept on the image."""
    a, b, c, d = (min(1000.0, max(0.0, float(v))) for v in box)
    x0, y0, x1, y1 = from_cog((min(a, c), min(b, d), max(a, c), max(b, d)), "xyxy", size)
    return x0, y0, x1, y1


def figure(thumb: Thumb, shapes: Sequence[Shape], caption: str = "") -> str:
    """An image with its boxes (SVG in image pixels) and labels; a grey placeholder when the image is unreadable."""
    if thumb.key is None or thumb.size is None:
        return f'<div class="fig missing"><span>{esc(thumb.error or "no image")}</span></div>'
    w, h = thumb.size
    dw, dh = display_size(thumb.size)
    rects, labels = [], []
    for s in shapes:
        x0, y0, x1, y1 = box_pixels(s.box, thumb.size)
        rects.append(f'<rect x="{x0:g}" y="{y0:g}" width="{x1 - x0:g}" height="{y1 - y0:g}" stroke="{s.colour}"'
                     f' stroke-width="{s.width}"/>')
        if s.point:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            rects.append(f'<circle cx="{cx:g}" cy="{cy:g}" r="{max(w, h) / 80:g}" fill="{s.colour}"/>')
        if s.label:
            # Outside the box when there is room (above, or below for `below`), else just inside the edge.
            edge = y1 if s.below else y0
            outside = (1 - y1 / h > 0.08) if s.below else (y0 / h > 0.08)
            cls = "lbl" + (" dn" if s.below == outside else "")
            labels.append(f'<span class="{cls}" style="left:{100 * x0 / w:.3f}%;'
                          f'top:{100 * edge / h:.3f}%;background:{s.colour}">{esc(s.label)}</span>')
    svg = (f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none" fill="none">'
           + "".join(rects) + "</svg>")
    pixelated = ' class="px"' if dw > w else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (f'<figure><div class="fig" style="width:{dw}px;height:{dh}px">'
            f'<img data-k="{thumb.key}" width="{dw}" height="{dh}" alt=""{pixelated}>{svg}{"".join(labels)}</div>'
            f"{cap}</figure>")


# --------------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------------


@dataclass
class Card:
    """One card: inner HTML, CSS class (err/warn/ok), sort keys (numbers; None sorts last), search text, anchors."""

    html: str
    cls: str = ""
    keys: dict[str, float | None] = field(default_factory=dict)
    text: str = ""
    anchors: list[str] = field(default_factory=list)  # ids / line numbers that "go to" finds


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f3f4f6;color:#1f2328}
header.top{background:#fff;border-bottom:1px solid #d0d7de;padding:10px 16px;position:sticky;top:0;z-index:5}
header.top h1{font-size:17px;margin:0 0 4px}
.bar{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin-top:6px}
.bar input{width:160px}
main{padding:12px 16px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:10px 12px;margin:0 0 12px}
.card.err{border-left:5px solid #cf222e}.card.warn{border-left:5px solid #bf8700}
.card.ok{border-left:5px solid #1a7f37}
.card h2{font-size:14px;margin:0 0 6px;display:flex;gap:8px;flex-wrap:wrap;align-items:baseline}
.src{font:12px ui-monospace,monospace;color:#57606a}
.badge{font-size:12px;border-radius:10px;padding:0 8px;background:#eaeef2}
.badge.bad{background:#ffebe9;color:#a40e26}.badge.good{background:#dafbe1;color:#116329}
.badge.warn{background:#fff8c5;color:#7d4e00}
.problems{margin:4px 0 8px;padding-left:18px;color:#a40e26;font-size:13px}.problems .w{color:#7d4e00}
.row{display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap}
figure{margin:0}figcaption{font-size:12px;color:#57606a;max-width:360px}
.fig{position:relative;flex:none;background:#eee;overflow:visible}
.fig img{display:block;width:100%;height:100%}.fig img.px{image-rendering:pixelated}
.fig svg{position:absolute;left:0;top:0;width:100%;height:100%;overflow:visible}
.fig rect{vector-effect:non-scaling-stroke}
.fig.missing{width:240px;height:120px;display:flex;align-items:center;justify-content:center;
 color:#a40e26;font-size:12px;padding:6px;box-sizing:border-box;border:1px dashed #cf222e;overflow:hidden;
 word-break:break-all}
.lbl{position:absolute;transform:translateY(calc(-100% - 2px));color:#fff;font-size:11px;line-height:14px;
 padding:0 3px;white-space:nowrap;border-radius:2px;pointer-events:none;max-width:200px;overflow:hidden}
.lbl.dn{transform:translateY(2px)}
.conv{flex:1;min-width:280px;font-size:13px}
.msg{white-space:pre-wrap;word-break:break-word;padding:3px 6px;margin:2px 0;border-radius:3px}
.msg .role{font-weight:600;color:#57606a;margin-right:6px}
.msg.system{background:#f6f8fa}.msg.loss{background:#dafbe1}
.tok{white-space:pre-wrap;word-break:break-word;font:12px/1.6 ui-monospace,monospace}
.tok .loss{background:#aceebb;border-bottom:2px solid #1a7f37}
.tok .sp{background:#ddf4ff;color:#0550ae;border-radius:2px;padding:0 2px}
.img{display:inline-block;background:#fbefff;color:#6639ba;border:1px solid #c297ff;border-radius:3px;
 padding:0 4px;font:12px system-ui,sans-serif;margin:0 2px}
.bx{border:1px solid;border-radius:3px;padding:0 2px;font-weight:600}
table.boxes{border-collapse:collapse;font-size:12px;margin-top:6px}
table.boxes td,table.boxes th{border:1px solid #d0d7de;padding:1px 6px;text-align:left;white-space:nowrap}
table.boxes td.e{color:#a40e26;white-space:normal}table.boxes td.p{white-space:normal}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:middle}
.metrics{border-collapse:collapse;font-size:13px}.metrics td{padding:1px 10px 1px 0}
.legend span{margin-right:12px}
#jserr{background:#ffebe9;color:#a40e26;padding:6px 16px}
details{margin-top:6px}
"""

# Records any script error on <html data-js-error> and shows it, so a broken page never looks merely empty.
_ERROR_HOOK = ("window.addEventListener('error',function(e){document.documentElement.setAttribute('data-js-error',"
               "String(e.message));var b=document.getElementById('jserr');if(b){b.hidden=false;"
               "b.textContent='This page hit a script error: '+e.message;}});")

_JS = r"""
(function(){
var D=JSON.parse(document.getElementById('page-data').textContent);
var C=D.cards,I=D.images,S=D.sorts,box=document.getElementById('cards');
var st={page:0,size:D.page_size,sort:D.default_sort,q:''};
var order=C.map(function(_,i){return i;});
function cmp(a,b,spec){for(var j=0;j<spec.length;j++){var k=spec[j][0],d=spec[j][1];
 var x=C[a].k[k],y=C[b].k[k];if(x===y)continue;if(x===null||x===undefined)return 1;
 if(y===null||y===undefined)return -1;return (x<y?-1:1)*d;}return a-b;}
function sortBy(name){var spec=S[name]||[];st.sort=name;
 order=C.map(function(_,i){return i;}).sort(function(a,b){return cmp(a,b,spec);});}
function view(){if(!st.q)return order;var q=st.q.toLowerCase();
 return order.filter(function(i){return C[i].t.indexOf(q)>=0;});}
function render(){var v=view(),pages=Math.max(1,Math.ceil(v.length/st.size));
 st.page=Math.min(Math.max(st.page,0),pages-1);
 box.innerHTML=v.slice(st.page*st.size,(st.page+1)*st.size).map(function(i){return C[i].h;}).join('');
 box.querySelectorAll('img[data-k]').forEach(function(im){im.src=I[+im.getAttribute('data-k')];});
 document.querySelectorAll('.pageinfo').forEach(function(e){e.textContent='page '+(st.page+1)+' of '+pages+
  ' ('+v.length+' card'+(v.length===1?'':'s')+')';});}
function go(what){var v=view();for(var p=0;p<v.length;p++){if(C[v[p]].a.indexOf(String(what))>=0){
 st.page=Math.floor(p/st.size);render();var el=document.getElementById('c'+v[p]);
 if(el){var top=document.querySelector('header.top').offsetHeight;
 window.scrollTo(0,el.getBoundingClientRect().top+window.scrollY-top-8);}return true;}}return false;}
document.querySelectorAll('.prev').forEach(function(b){b.onclick=function(){st.page--;render();};});
document.querySelectorAll('.next').forEach(function(b){b.onclick=function(){st.page++;render();};});
var sel=document.getElementById('sort');if(sel)sel.onchange=function(){sortBy(sel.value);st.page=0;render();};
var q=document.getElementById('q');q.oninput=function(){st.q=q.value.trim();st.page=0;render();};
var g=document.getElementById('goto');g.onkeydown=function(e){if(e.key==='Enter'&&!go(g.value.trim()))
 g.setCustomValidity('not found');else g.setCustomValidity('');};
var h={};location.hash.replace(/^#/,'').split('&').forEach(function(kv){var p=kv.split('=');
 if(p[0])h[decodeURIComponent(p[0])]=decodeURIComponent(p.slice(1).join('='));});
if(h.sort&&S[h.sort]){st.sort=h.sort;if(sel)sel.value=h.sort;}
sortBy(st.sort);if(h.page)st.page=parseInt(h.page,10)-1||0;render();if(h.go)go(h.go);
})();
"""


def _json_for_script(obj: Any) -> str:
    """JSON safe inside <script>: no `</script>` or `<!--` can close or confuse the element."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_page(title: str, head_html: str, cards: Sequence[Card], images: ImageTable, *,
                sorts: dict[str, tuple[str, list[tuple[str, int]]]] | None = None, default_sort: str = "file",
                page_size: int = 25) -> str:
    """The whole document. `sorts`: name -> (label, [(key, 1 ascending / -1 descending), ...])."""
    sorts = {"file": ("file order", []), **(sorts or {})}
    if default_sort not in sorts:
        raise ValueError(f"default_sort {default_sort!r} is not one of {', '.join(sorts)}")
    data = {
        "cards": [{"h": f'<article id="c{i}" class="card {c.cls}">{c.html}</article>', "k": c.keys,
                   "t": c.text.lower(), "a": [str(a) for a in c.anchors]} for i, c in enumerate(cards)],
        "images": images.urls,
        "sorts": {name: [list(s) for s in spec] for name, (_, spec) in sorts.items()},
        "default_sort": default_sort,
        "page_size": page_size,
    }
    options = "".join(f'<option value="{esc(n)}"{" selected" if n == default_sort else ""}>{esc(label)}</option>'
                      for n, (label, _) in sorts.items())
    sort_html = f'<label>sort <select id="sort">{options}</select></label>' if len(sorts) > 1 else ""
    pager = ('<button class="prev">&larr; prev</button><span class="pageinfo"></span>'
             '<button class="next">next &rarr;</button>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{esc(title)}</title>"
        f"<script>{_ERROR_HOOK}</script><style>{_CSS}</style></head><body>"
        f"<div id=\"jserr\" hidden></div><header class=\"top\"><h1>{esc(title)}</h1>{head_html}"
        f"<div class=\"bar\">{pager}{sort_html}<label>search <input id=\"q\" type=\"search\"></label>"
        "<label>go to line/id <input id=\"goto\" placeholder=\"e.g. 412\"></label></div></header>"
        "<main><noscript>This page shows its cards with JavaScript; please enable it.</noscript>"
        f"<div id=\"cards\"></div><div class=\"bar\">{pager}</div></main>"
        f"<script type=\"application/json\" id=\"page-data\">{_json_for_script(data)}</script>"
        f"<script>{_JS}</script></body></html>\n"
    )


def write_page(path: str | Path, text: str) -> Path:
    """Write atomically (temp file + rename) with the permissions the umask gives a new file."""
    return write_atomic(path, text)
