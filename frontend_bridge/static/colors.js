// Colours and marker shapes shared by the WebGL shaders, the legend and the colour bar.

// Viridis as a degree-6 polynomial (max error < 1/255); the same coefficients are in the vertex shader,
// so the colour bar and the points agree without a lookup texture.
const VIRIDIS = [
  [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
  [0.1050930431085774, 1.404613529898575, 1.384590162594685],
  [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
  [-4.634230498983486, -5.799100973351585, -19.33244095627987],
  [6.228269936347081, 14.17993336680509, 56.69055260068105],
  [4.776384997670288, -13.74514537774601, -65.35303263337234],
  [-5.435455855934631, 4.645852612178535, 26.3124352495832],
];

export const VIRIDIS_GLSL = `
vec3 viridis(float t) {
  const vec3 c0 = vec3(${VIRIDIS[0].join(', ')});
  const vec3 c1 = vec3(${VIRIDIS[1].join(', ')});
  const vec3 c2 = vec3(${VIRIDIS[2].join(', ')});
  const vec3 c3 = vec3(${VIRIDIS[3].join(', ')});
  const vec3 c4 = vec3(${VIRIDIS[4].join(', ')});
  const vec3 c5 = vec3(${VIRIDIS[5].join(', ')});
  const vec3 c6 = vec3(${VIRIDIS[6].join(', ')});
  return c0 + t * (c1 + t * (c2 + t * (c3 + t * (c4 + t * (c5 + t * c6)))));
}`;

/** Viridis at t in [0, 1] as [r, g, b] in 0..255. */
export function viridis(t) {
  const u = Math.min(1, Math.max(0, t));
  return [0, 1, 2].map((k) => {
    let v = VIRIDIS[6][k];
    for (let i = 5; i >= 0; i -= 1) v = VIRIDIS[i][k] + u * v;
    return Math.round(255 * Math.min(1, Math.max(0, v)));
  });
}

// Tableau 10: distinguishable on white, and stays apart from viridis' yellow-green end well enough.
export const CLUSTER_PALETTE = [
  [0.122, 0.467, 0.706], [1.0, 0.498, 0.055], [0.173, 0.627, 0.173], [0.839, 0.153, 0.157],
  [0.580, 0.404, 0.741], [0.549, 0.337, 0.294], [0.890, 0.467, 0.761], [0.498, 0.498, 0.498],
  [0.737, 0.741, 0.133], [0.090, 0.745, 0.812],
];
export const UNASSIGNED_COLOR = [0.62, 0.62, 0.62];

// Marker shape per cluster (cluster mod 5); the fragment shader draws the same five.
export const SHAPE_GLYPHS = ['●', '■', '◆', '▲', '✖'];
export const SHAPE_COUNT = SHAPE_GLYPHS.length;

export function clusterCss(cluster) {
  const c = cluster < 0 ? UNASSIGNED_COLOR : CLUSTER_PALETTE[cluster % CLUSTER_PALETTE.length];
  return `rgb(${c.map((v) => Math.round(v * 255)).join(',')})`;
}

export function clusterGlyph(cluster) {
  return cluster < 0 ? '○' : SHAPE_GLYPHS[cluster % SHAPE_COUNT];
}

export function viridisGradientCss() {
  const stops = [];
  for (let i = 0; i <= 10; i += 1) stops.push(`rgb(${viridis(i / 10).join(',')}) ${i * 10}%`);
  return `linear-gradient(to right, ${stops.join(', ')})`;
}
