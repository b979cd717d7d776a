// Command render renders a Helm chart's templates the way `helm template`
// does, with the same engine: Go's text/template, the sprig function library
// and Helm's own functions (include, tpl, required, toYaml, fromYaml, toJson,
// fromJson, lookup). It exists because no helm binary can be installed where
// Fathom's CI runs; users run `helm lint` / `helm template` / `helm install`.
//
// Usage:
//
//	render -chart DIR [-f values.yaml]... [-name RELEASE] [-namespace NS]
//	       [-kube-version 1.33.0] [-api-versions monitoring.coreos.com/v1,...]
//	       -out DIR
//
// Every rendered template with content is written to OUT/<template path>
// (documents prefixed with `# Source:` like helm template); NOTES.txt goes to
// OUT/NOTES.txt. A template error (including `fail` and `required`) exits 1
// with Helm's message.
//
// Semantics copied from Helm 3 (pkg/engine, pkg/chartutil):
//   - values: the chart's values.yaml, then each -f file deep-merged over it;
//     a null in an override deletes the key; numbers are float64 (Helm parses
//     YAML through JSON, so 1000000 prints as 1e+06 unless formatted);
//   - every file under templates/ is parsed into one set (so `define`s are
//     shared); files starting with `_` are not rendered;
//   - missing keys render as empty ("<no value>" is removed);
//   - toYaml marshals through JSON (sorted keys) and drops the final newline.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	yamlv2 "gopkg.in/yaml.v2"
	yaml "gopkg.in/yaml.v3"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var (
		chartDir    = flag.String("chart", "", "chart directory (with Chart.yaml)")
		name        = flag.String("name", "fathom", "release name")
		namespace   = flag.String("namespace", "fathom", "release namespace")
		kubeVersion = flag.String("kube-version", "1.33.0", "Capabilities.KubeVersion")
		apiVersions = flag.String("api-versions", "", "extra Capabilities.APIVersions, comma-separated")
		out         = flag.String("out", "", "output directory")
		valueFiles  listFlag
	)
	flag.Var(&valueFiles, "f", "values file (repeatable; later files win)")
	flag.Parse()
	if *chartDir == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "render: -chart and -out are required")
		os.Exit(2)
	}
	if err := run(*chartDir, *name, *namespace, *kubeVersion, *apiVersions, valueFiles, *out); err != nil {
		fmt.Fprintf(os.Stderr, "render: %v\n", err)
		os.Exit(1)
	}
}

// readYAML parses a YAML document into JSON-compatible values
// (map[string]interface{}, []interface{}, float64, string, bool, nil), as
// sigs.k8s.io/yaml does for Helm.
func readYAML(data []byte) (map[string]interface{}, error) {
	var raw interface{}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, err
	}
	if raw == nil {
		return map[string]interface{}{}, nil
	}
	j, err := json.Marshal(raw)
	if err != nil {
		return nil, err
	}
	var m map[string]interface{}
	if err := json.Unmarshal(j, &m); err != nil {
		return nil, fmt.Errorf("top level is not a mapping: %v", err)
	}
	return m, nil
}

// coalesce merges src over dst (Helm's CoalesceTables for user values):
// maps merge recursively, anything else replaces, null deletes.
func coalesce(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sv, sIsMap := v.(map[string]interface{})
		dv, dIsMap := dst[k].(map[string]interface{})
		if sIsMap && dIsMap {
			dst[k] = coalesce(dv, sv)
		} else {
			dst[k] = v
		}
	}
	return dst
}

func toYAML(v interface{}) string {
	j, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var obj interface{}
	if err := yamlv2.Unmarshal(j, &obj); err != nil {
		return ""
	}
	y, err := yamlv2.Marshal(obj)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(y), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m, err := readYAML([]byte(s))
	if err != nil {
		return map[string]interface{}{"Error": err.Error()}
	}
	return m
}

func toJSON(v interface{}) string {
	j, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(j)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

// chartMeta is Chart.yaml with the field names templates use (.Chart.Name).
type chartMeta struct {
	APIVersion  string            `yaml:"apiVersion"`
	Name        string            `yaml:"name"`
	Version     string            `yaml:"version"`
	AppVersion  string            `yaml:"appVersion"`
	Description string            `yaml:"description"`
	Type        string            `yaml:"type"`
	KubeVersion string            `yaml:"kubeVersion"`
	Home        string            `yaml:"home"`
	Sources     []string          `yaml:"sources"`
	Keywords    []string          `yaml:"keywords"`
	Annotations map[string]string `yaml:"annotations"`
	Icon        string            `yaml:"icon"`
	Deprecated  bool              `yaml:"deprecated"`
	Maintainers []struct {
		Name  string `yaml:"name"`
		Email string `yaml:"email"`
		URL   string `yaml:"url"`
	} `yaml:"maintainers"`
}

type versionSet []string

// Has reports whether an API version (group/version or group/version/Kind)
// is available, like Helm's .Capabilities.APIVersions.Has.
func (v versionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// Built-in API versions of the Kubernetes release the chart is rendered for
// (those this renderer's users ask about).
var builtinAPIVersions = []string{
	"v1", "apps/v1", "batch/v1", "policy/v1", "rbac.authorization.k8s.io/v1",
	"scheduling.k8s.io/v1", "networking.k8s.io/v1", "autoscaling/v2",
	"apiextensions.k8s.io/v1", "admissionregistration.k8s.io/v1",
}

func run(chartDir, name, namespace, kubeVersion, extraAPIs string, valueFiles []string, out string) error {
	chartYAML, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	var meta chartMeta
	if err := yaml.Unmarshal(chartYAML, &meta); err != nil {
		return fmt.Errorf("Chart.yaml: %v", err)
	}
	if meta.APIVersion != "v2" || meta.Name == "" || meta.Version == "" {
		return errors.New("Chart.yaml: apiVersion v2, name and version are required")
	}

	values := map[string]interface{}{}
	defaults, err := os.ReadFile(filepath.Join(chartDir, "values.yaml"))
	if err == nil {
		if values, err = readYAML(defaults); err != nil {
			return fmt.Errorf("values.yaml: %v", err)
		}
	} else if !os.IsNotExist(err) {
		return err
	}
	for _, f := range valueFiles {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		override, err := readYAML(data)
		if err != nil {
			return fmt.Errorf("%s: %v", f, err)
		}
		values = coalesce(values, override)
	}

	kv := strings.TrimPrefix(kubeVersion, "v")
	parts := strings.SplitN(kv, ".", 3)
	if len(parts) < 2 {
		return fmt.Errorf("-kube-version %q: expected MAJOR.MINOR[.PATCH]", kubeVersion)
	}
	apis := append(versionSet{}, builtinAPIVersions...)
	for _, a := range strings.Split(extraAPIs, ",") {
		if a = strings.TrimSpace(a); a != "" {
			apis = append(apis, a)
		}
	}
	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": name, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart": meta,
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{
				"Version": "v" + kv, "GitVersion": "v" + kv,
				"Major": parts[0], "Minor": parts[1],
			},
			"APIVersions": apis,
			"HelmVersion": map[string]interface{}{"Version": "v3.14.0"},
		},
	}

	// Every template file, parsed into one set.
	tdir := filepath.Join(chartDir, "templates")
	var files []string
	err = filepath.Walk(tdir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if !info.IsDir() {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(files)

	t := template.New("gotpl").Option("missingkey=zero")
	includedNames := map[string]int{}
	funcs := sprig.TxtFuncMap()
	// Helm removes these from sprig.
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = fromYAML
	funcs["toJson"] = toJSON
	funcs["fromJson"] = fromJSON
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, errors.New(msg)
		}
		return v, nil
	}
	funcs["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil // helm template has no cluster
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if includedNames[name] > 1000 {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		includedNames[name]++
		defer func() { includedNames[name]-- }()
		var buf bytes.Buffer
		if err := t.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		clone, err := t.Clone()
		if err != nil {
			return "", err
		}
		nt, err := clone.New("tpl").Parse(text)
		if err != nil {
			return "", fmt.Errorf("cannot parse template %q: %v", text, err)
		}
		var buf bytes.Buffer
		if err := nt.Execute(&buf, data); err != nil {
			return "", fmt.Errorf("error calling tpl: %v", err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	t.Funcs(funcs)

	chartName := meta.Name
	names := map[string]string{} // template name -> file
	for _, f := range files {
		rel, _ := filepath.Rel(chartDir, f)
		tname := path.Join(chartName, filepath.ToSlash(rel))
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		if _, err := t.New(tname).Parse(string(data)); err != nil {
			return fmt.Errorf("parse error in %s: %v", tname, err)
		}
		names[tname] = f
	}

	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	var order []string
	for n := range names {
		order = append(order, n)
	}
	sort.Strings(order)
	for _, tname := range order {
		base := path.Base(tname)
		if strings.HasPrefix(base, "_") {
			continue
		}
		isNotes := base == "NOTES.txt"
		if !isNotes && !(strings.HasSuffix(base, ".yaml") || strings.HasSuffix(base, ".yml") || strings.HasSuffix(base, ".tpl")) {
			continue
		}
		scope := map[string]interface{}{}
		for k, v := range top {
			scope[k] = v
		}
		scope["Template"] = map[string]interface{}{
			"Name": tname, "BasePath": path.Join(chartName, "templates"),
		}
		var buf bytes.Buffer
		if err := t.ExecuteTemplate(&buf, tname, scope); err != nil {
			return fmt.Errorf("%v", cleanErr(err))
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		var dest string
		if isNotes {
			dest = filepath.Join(out, "NOTES.txt")
		} else {
			rel := strings.TrimPrefix(tname, chartName+"/")
			dest = filepath.Join(out, filepath.FromSlash(rel))
			text = "---\n# Source: " + tname + "\n" + text
		}
		if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(dest, []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// cleanErr shortens Go's template error to Helm's "execution error at
// (template:line:col): message" form, which `fail` and `required` messages
// read best in.
func cleanErr(err error) error {
	msg := err.Error()
	if i := strings.LastIndex(msg, "error calling fail: "); i >= 0 {
		return errors.New("execution error: " + msg[i+len("error calling fail: "):])
	}
	if i := strings.LastIndex(msg, "error calling required: "); i >= 0 {
		return errors.New("execution error: " + msg[i+len("error calling required: "):])
	}
	return err
}
