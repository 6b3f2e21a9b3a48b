{{/*
Expand the name of the chart.
*/}}
{{- define "courier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name (release-prefixed, 63 chars max; see helm create).
*/}}
{{- define "courier.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "courier.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "courier.labels" -}}
helm.sh/chart: {{ include "courier.chart" . }}
{{ include "courier.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: courier
{{- end }}

{{/*
Selector labels (every Courier workload pod carries these).
*/}}
{{- define "courier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "courier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-service helpers take (dict "root" $ "svc" $svc).
*/}}
{{- define "courier.componentName" -}}
{{- printf "%s-%s" (include "courier.fullname" .root) .svc.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "courier.componentSelectorLabels" -}}
{{ include "courier.selectorLabels" .root }}
app.kubernetes.io/component: {{ .svc.name }}
{{- end }}

{{- define "courier.componentLabels" -}}
{{ include "courier.labels" .root }}
app.kubernetes.io/component: {{ .svc.name }}
{{- end }}

{{/*
Image reference: registry/repository:tag, tag defaulting to the chart's appVersion.
*/}}
{{- define "courier.image" -}}
{{- $tag := .svc.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .svc.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .svc.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
NetworkPolicy ports list from a list of TCP port numbers.
*/}}
{{- define "courier.tcpPorts" -}}
{{- range . }}
- protocol: TCP
  port: {{ . }}
{{- end }}
{{- end }}
