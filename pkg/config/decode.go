package config

import (
	"bytes"
	"errors"
	"io"
	"math"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Parse parses a YAML configuration. It starts from Default, so keys the
// text leaves out keep their defaults, and then validates the result. All
// problems are reported at once, as Errors, each with its line and field:
// YAML syntax, unknown keys, malformed values and the checks of Validate.
func Parse(data []byte) (*Config, error) {
	c := Default()
	d := &decoder{lines: map[string]int{}}
	root, err := d.document(data)
	if err != nil {
		return nil, err
	}
	if root != nil {
		d.config(root, c)
	}
	failed := map[string]bool{}
	for _, e := range d.errs {
		failed[e.Field] = true
	}
	if verr := c.Validate(); verr != nil {
		for _, e := range verr.(Errors) {
			// A field that did not parse kept its default; whatever
			// Validate says about it is not news.
			if failed[e.Field] {
				continue
			}
			e.Line = d.line(e.Field)
			d.errs = append(d.errs, e)
		}
	}
	if len(d.errs) > 0 {
		d.errs.sortByLine()
		return nil, d.errs
	}
	return c, nil
}

// yamlLine finds the line in yaml.v3's syntax errors, "yaml: line 3: ...".
var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// parserProblems are the problems of yaml.v3's parser, as opposed to its
// scanner. For these it reports a 0-based line, that of the block around
// the problem when there is one (v3.0.1, decode.go, parser.fail); the
// scanner's lines are 1-based already.
var parserProblems = map[string]bool{
	"did not find expected <stream-start>":   true,
	"did not find expected <document start>": true,
	"did not find expected node content":     true,
	"did not find expected '-' indicator":    true,
	"did not find expected key":              true,
	"did not find expected ',' or ']'":       true,
	"did not find expected ',' or '}'":       true,
	"found duplicate %YAML directive":        true,
	"found duplicate %TAG directive":         true,
	"found incompatible YAML document":       true,
	"found undefined tag handle":             true,
}

// document parses the YAML text and returns its root mapping, or nil for
// an empty document.
func (d *decoder) document(data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	switch err := dec.Decode(&doc); {
	case errors.Is(err, io.EOF):
		return nil, nil
	case err != nil:
		// yaml.v3 leaves the line out when its 0-based mark is 0: the
		// problem is on the first line.
		e := &FieldError{Line: 1, Msg: strings.TrimPrefix(err.Error(), "yaml: ")}
		if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
			e.Line, _ = strconv.Atoi(m[1])
			e.Msg = m[2]
			if parserProblems[e.Msg] {
				e.Line++
			}
		}
		return nil, Errors{e}
	}
	var next yaml.Node
	if err := dec.Decode(&next); !errors.Is(err, io.EOF) {
		line := next.Line
		if err != nil {
			line = 0
		}
		return nil, Errors{{Line: line, Msg: "a second YAML document; the configuration is one document"}}
	}
	root := doc.Content[0]
	if root = resolve(root); isNull(root) {
		return nil, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, Errors{{Line: root.Line, Msg: "the configuration must be a mapping of keys to values"}}
	}
	return root, nil
}

// decoder walks the YAML node tree with the schema in its hands, so that
// every problem names the field path and the line, and decoding goes on
// after a problem to find the others.
type decoder struct {
	problems
	// lines maps field paths to their lines, so that problems Validate
	// finds later can be placed in the file too.
	lines map[string]int
}

// line returns the line of a field path, or of the nearest enclosing
// field that has one.
func (d *decoder) line(path string) int {
	for path != "" {
		if l, ok := d.lines[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return 0
}

// field is one key of a mapping and what decodes its value.
type field struct {
	key    string
	decode func(n *yaml.Node, path string)
}

// fieldFunc is the usual decode function of a field.
type fieldFunc = func(n *yaml.Node, path string)

func (d *decoder) config(n *yaml.Node, c *Config) {
	d.mapping(n, "", []field{
		{"listen", value(d, &c.Listen, parseListen)},
		{"state", d.str(&c.State)},
		{"endpoint", d.str(&c.Endpoint)},
		{"mtu", d.integer(&c.MTU)},
		{"tun", d.section([]field{
			{"name", d.str(&c.TUN.Name)},
			{"fd", d.integer(&c.TUN.FD)},
		})},
		{"pools", d.section([]field{
			{"v4", value(d, &c.Pools.V4, parsePool)},
			{"v6", value(d, &c.Pools.V6, parsePool)},
		})},
		{"dns", d.section([]field{
			{"upstreams", list(d, &c.DNS.Upstreams, parseUpstream)},
		})},
		{"egress", d.section([]field{
			{"addrs", list(d, &c.Egress.Addrs, parseAddr)},
			{"ports", value(d, &c.Egress.Ports, parsePorts)},
			{"shard", func(n *yaml.Node, path string) {
				var s shard
				before := len(d.errs)
				value(d, &s, parseShard)(n, path)
				if len(d.errs) == before {
					c.Egress.Shard, c.Egress.Shards = s.i, s.n
				}
			}},
			{"dial_timeout", value(d, &c.Egress.DialTimeout, parseDuration)},
			{"keepalive", value(d, &c.Egress.KeepAlive, parseDuration)},
			{"udp_filtering", value(d, &c.Egress.UDPFiltering, parseFiltering)},
		})},
		{"policy", func(n *yaml.Node, path string) { d.policy(n, path, &c.Policy) }},
		{"table", d.section([]field{
			{"max_flows", d.integer(&c.Table.MaxFlows)},
			{"timeouts", d.section([]field{
				{"tcp_new", value(d, &c.Table.Timeouts.TCPNew, parseDuration)},
				{"tcp_established", value(d, &c.Table.Timeouts.TCPEstablished, parseDuration)},
				{"tcp_closing", value(d, &c.Table.Timeouts.TCPClosing, parseDuration)},
				{"udp_unreplied", value(d, &c.Table.Timeouts.UDPUnreplied, parseDuration)},
				{"udp_assured", value(d, &c.Table.Timeouts.UDPAssured, parseDuration)},
				{"icmp", value(d, &c.Table.Timeouts.ICMP, parseDuration)},
			})},
		})},
		{"tcp", d.section([]field{
			{"max_in_flight", d.integer(&c.TCP.MaxInFlight)},
			{"congestion_control", d.str(&c.TCP.CongestionControl)},
		})},
		{"admin", d.section([]field{
			{"listen", value(d, &c.Admin.Listen, parseAdminListen)},
			{"insecure", d.boolean(&c.Admin.Insecure)},
		})},
		{"log", d.section([]field{
			{"level", value(d, &c.Log.Level, parseLevel)},
		})},
		{"shutdown", d.section([]field{
			{"grace", value(d, &c.Shutdown.Grace, parseDuration)},
		})},
		{"edge", func(n *yaml.Node, path string) { d.edge(n, path, &c.Edge) }},
	})
}

func (d *decoder) policy(n *yaml.Node, path string, p *Policy) {
	// limits comes before peers in this list, whatever the order in the
	// file, because a peer's limits start from the global ones.
	d.mapping(n, path, []field{
		{"allow", list(d, &p.Allow, parseRule)},
		{"deny", list(d, &p.Deny, parseRule)},
		{"limits", d.limits(&p.Limits)},
		{"peers", func(n *yaml.Node, path string) {
			d.each(n, path, func(name string, v *yaml.Node, path string) {
				if p.Peers == nil {
					p.Peers = map[string]PeerPolicy{}
				}
				pp := p.Peers[name]
				if isNull(v) {
					// A peer listed with nothing: the global policy.
					p.Peers[name] = pp
					return
				}
				d.mapping(v, path, []field{
					{"allow", list(d, &pp.Allow, parseRule)},
					{"deny", list(d, &pp.Deny, parseRule)},
					{"limits", func(n *yaml.Node, path string) {
						lim := p.Limits
						d.limits(&lim)(n, path)
						pp.Limits = &lim
					}},
				})
				p.Peers[name] = pp
			})
		}},
	})
}

func (d *decoder) limits(l *Limits) fieldFunc {
	return d.section([]field{
		{"new_flows_per_second", d.float(&l.NewFlowsPerSecond)},
		{"burst", d.integer(&l.Burst)},
		{"max_flows", d.integer(&l.MaxFlows)},
		{"max_handshakes", d.integer(&l.MaxHandshakes)},
	})
}

// resolve follows aliases to the node they stand for.
func resolve(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// join makes a field path.
func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// mapping decodes the mapping n with fields, in the order of fields rather
// than of the text, so that a field may rely on one listed before it. Null
// values keep what is there.
func (d *decoder) mapping(n *yaml.Node, path string, fields []field) {
	values := map[string]*yaml.Node{}
	d.each(n, path, func(key string, v *yaml.Node, fpath string) {
		for _, f := range fields {
			if f.key == key {
				values[key] = v
				return
			}
		}
		msg := "unknown field"
		if s := suggest(key, fields); s != "" {
			msg += " (did you mean " + s + "?)"
		}
		d.addLine(d.lines[fpath], fpath, "%s", msg)
	})
	for _, f := range fields {
		if v, ok := values[f.key]; ok && !isNull(v) {
			f.decode(v, join(path, f.key))
		}
	}
}

// each calls fn for every key of the mapping n, after checking that n is a
// mapping and that its keys are unique strings.
func (d *decoder) each(n *yaml.Node, path string, fn func(key string, v *yaml.Node, path string)) {
	n = resolve(n)
	if n.Kind != yaml.MappingNode {
		d.addLine(n.Line, path, "want a mapping of keys to values, have %s", describe(n))
		return
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			d.addLine(k.Line, path, "a key must be a plain name, have %s", describe(k))
			continue
		}
		if k.Value == "<<" && k.ShortTag() == "!!merge" {
			d.addLine(k.Line, path, "merge keys (<<) are not supported; repeat the keys")
			continue
		}
		fpath := join(path, k.Value)
		if first, dup := seen[k.Value]; dup {
			d.addLine(k.Line, fpath, "given twice (first on line %d)", first)
			continue
		}
		seen[k.Value] = k.Line
		d.lines[fpath] = k.Line
		fn(k.Value, v, fpath)
	}
}

// section returns a decode function for a nested mapping.
func (d *decoder) section(fields []field) fieldFunc {
	return func(n *yaml.Node, path string) { d.mapping(n, path, fields) }
}

// scalar returns n's text, or reports that n is not a scalar.
func (d *decoder) scalar(n *yaml.Node, path string) (string, bool) {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode {
		d.addLine(n.Line, path, "want a single value, have %s", describe(n))
		return "", false
	}
	if isNull(n) {
		d.addLine(n.Line, path, "no value")
		return "", false
	}
	return n.Value, true
}

// value returns a decode function that reads a scalar with parse.
func value[T any](d *decoder, dst *T, parse func(string) (T, error)) fieldFunc {
	return func(n *yaml.Node, path string) {
		s, ok := d.scalar(n, path)
		if !ok {
			return
		}
		v, err := parse(s)
		if err != nil {
			d.addLine(resolve(n).Line, path, "%v", err)
			return
		}
		*dst = v
	}
}

// list returns a decode function that reads a sequence of scalars with
// parse, naming each bad element by its index. An empty sequence leaves
// dst nil, so that a parsed Config compares equal to its round trip.
func list[T any](d *decoder, dst *[]T, parse func(string) (T, error)) fieldFunc {
	return func(n *yaml.Node, path string) {
		n = resolve(n)
		if n.Kind != yaml.SequenceNode {
			d.addLine(n.Line, path, "want a list, have %s", describe(n))
			return
		}
		var out []T
		for i, e := range n.Content {
			epath := path + "[" + strconv.Itoa(i) + "]"
			d.lines[epath] = resolve(e).Line
			var v T
			before := len(d.errs)
			value(d, &v, parse)(e, epath)
			if len(d.errs) == before {
				out = append(out, v)
			}
		}
		*dst = out
	}
}

func (d *decoder) str(dst *string) fieldFunc {
	return value(d, dst, func(s string) (string, error) { return s, nil })
}

func (d *decoder) integer(dst *int) fieldFunc {
	return func(n *yaml.Node, path string) {
		s, ok := d.scalar(n, path)
		if !ok {
			return
		}
		if resolve(n).ShortTag() != "!!int" {
			d.addLine(resolve(n).Line, path, "%q is not a whole number", s)
			return
		}
		v, err := strconv.ParseInt(s, 0, 0)
		if err != nil {
			d.addLine(resolve(n).Line, path, "%s is too large", s)
			return
		}
		*dst = int(v)
	}
}

func (d *decoder) float(dst *float64) fieldFunc {
	return func(n *yaml.Node, path string) {
		s, ok := d.scalar(n, path)
		if !ok {
			return
		}
		var v float64
		var err error
		switch resolve(n).ShortTag() {
		case "!!int":
			var i int64
			i, err = strconv.ParseInt(s, 0, 64)
			v = float64(i)
		case "!!float":
			v, err = strconv.ParseFloat(strings.ReplaceAll(s, "_", ""), 64)
			if math.IsInf(v, 0) || math.IsNaN(v) {
				err = errors.New("not finite")
			}
		default:
			err = errors.New("not a number")
		}
		if err != nil {
			d.addLine(resolve(n).Line, path, "%q is not a number", s)
			return
		}
		*dst = v
	}
}

func (d *decoder) boolean(dst *bool) fieldFunc {
	return func(n *yaml.Node, path string) {
		s, ok := d.scalar(n, path)
		if !ok {
			return
		}
		if resolve(n).ShortTag() != "!!bool" {
			d.addLine(resolve(n).Line, path, "%q is not true or false", s)
			return
		}
		*dst = s == "true" || s == "True" || s == "TRUE"
	}
}

// describe names a node's kind for "want X, have Y" messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "no value"
		}
		return strconv.Quote(n.Value)
	}
	return "something else"
}

// suggest returns the known key closest to a misspelt one, if one is close.
func suggest(key string, fields []field) string {
	best, bestDist := "", 3
	for _, f := range fields {
		if dist := editDistance(key, f.key); dist < bestDist {
			best, bestDist = f.key, dist
		}
	}
	return best
}

// editDistance is the optimal string alignment distance between a and b:
// Levenshtein with a swap of two neighbours counted as one edit, the
// commonest typing slip.
func editDistance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}
