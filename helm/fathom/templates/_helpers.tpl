{{/* Chart name, cut to the 63 characters of a DNS label. */}}
{{- define "fathom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; the release name alone when it already holds the chart's. */}}
{{- define "fathom.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fathom.agentName" -}}
{{- printf "%s-agent" (include "fathom.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fathom.collectorName" -}}
{{- printf "%s-collector" (include "fathom.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fathom.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fathom.labels" -}}
helm.sh/chart: {{ include "fathom.chart" . }}
app.kubernetes.io/name: {{ include "fathom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "agent"). */}}
{{- define "fathom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fathom.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fathom.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "fathom.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fathom.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fathom.priorityClassName" -}}
{{- if .Values.agent.priorityClass.create -}}
{{- default (include "fathom.agentName" .) .Values.agent.priorityClass.name -}}
{{- else -}}
{{- .Values.agent.priorityClass.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the pods read credentials from (its keys are all optional). */}}
{{- define "fathom.secretName" -}}
{{- default (printf "%s-credentials" (include "fathom.fullname" .)) .Values.credentials.existingSecret -}}
{{- end -}}

{{/* Whether the chart creates the Secret: some credential is set and no existing Secret is named. */}}
{{- define "fathom.createSecret" -}}
{{- $c := .Values.credentials -}}
{{- if and (not $c.existingSecret) (or $c.collectorToken $c.pyroscopeBasicAuth.username $c.pyroscopeBearerToken $c.otlpHeaders) -}}
true
{{- end -}}
{{- end -}}

{{/* Whether a collector token may exist (given here or in an existing Secret). */}}
{{- define "fathom.hasCollectorToken" -}}
{{- if or .Values.credentials.collectorToken .Values.credentials.existingSecret -}}
true
{{- end -}}
{{- end -}}

{{/* An env var from a key of the credentials Secret: (dict "root" $ "env" NAME "key" KEY). */}}
{{- define "fathom.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "fathom.secretName" .root }}
      key: {{ .key }}
      optional: true
{{- end -}}

{{/* Base URL of the collector's Service. */}}
{{- define "fathom.collectorHost" -}}
{{- printf "%s.%s.svc" (include "fathom.collectorName" .) .Release.Namespace -}}
{{- end -}}

{{- define "fathom.hasSignal" -}}
{{- if has .signal .root.Values.signals -}}
true
{{- end -}}
{{- end -}}

{{/* ConfigMap entries of the backends (the collector, or agents without one). */}}
{{- define "fathom.backendEnv" -}}
{{- with .Values.pyroscope.url }}
FATHOM_PYROSCOPE_URL: {{ . | quote }}
{{- end }}
{{- if and .Values.pyroscope.url .Values.pyroscope.orgId }}
FATHOM_PYROSCOPE_ORG_ID: {{ .Values.pyroscope.orgId | quote }}
{{- end }}
{{- with .Values.otlp.endpoint }}
FATHOM_OTLP_ENDPOINT: {{ . | quote }}
FATHOM_OTLP_PROTOCOL: {{ $.Values.otlp.protocol | quote }}
{{- end }}
{{- end -}}

{{/* Secret-backed env of whatever talks to the backends. */}}
{{- define "fathom.backendSecretEnv" -}}
{{ include "fathom.secretEnv" (dict "root" . "env" "FATHOM_PYROSCOPE_BASIC_AUTH" "key" "pyroscope-basic-auth") }}
{{ include "fathom.secretEnv" (dict "root" . "env" "FATHOM_PYROSCOPE_BEARER_TOKEN" "key" "pyroscope-bearer-token") }}
{{ include "fathom.secretEnv" (dict "root" . "env" "OTEL_EXPORTER_OTLP_HEADERS" "key" "otlp-headers") }}
{{- end -}}
