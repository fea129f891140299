{{/* The name of every object: the chart's name (one agent per cluster). */}}
{{- define "vha.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "vha.labels" -}}
app.kubernetes.io/name: {{ include "vha.name" . }}
{{- end -}}

{{/* The image reference: a digest, when given, pins it. */}}
{{- define "vha.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The Secret with the TLS material: its own, or the export Secret. */}}
{{- define "vha.tlsSecret" -}}
{{- .Values.export.tls.secretName | default .Values.export.secretName -}}
{{- end -}}
